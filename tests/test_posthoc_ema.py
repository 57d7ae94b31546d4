"""Post-hoc EMA (EDM2 power-function profiles): the math on a plain module, then the wiring through train.py.

Stated tolerance of a reconstruction at a length no profile has: the solved weights differ from the directly
tracked EMA of that length by at most 10% of the distance between the two snapshotted profiles' own weights
(the profile-level error of that solve is 2%, reconstruction_error below; measured weight error ~1-3%).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ldm.checkpoints.ema_snapshots import combine, list_snapshots, read_snapshot, snapshot_profiles
from ldm.diffusion.posthoc_ema import (
    PosthocEMA,
    PowerEMA,
    gamma_to_sigma_rel,
    profile_weights,
    reconstruction_error,
    sigma_rel_to_gamma,
    solve_coefficients,
)

from .conftest import ROOT, run_script

SIGMAS, TRACKED = [0.05, 0.10], 0.07


def test_sigma_rel_and_gamma_invert_each_other():
    for sigma in (0.01, 0.05, 0.10, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's table: 0.05 <-> 16.97
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.5)


def test_profile_weights_are_what_the_update_computes():
    """One-hot weights at every step: the averaged vector is the profile itself, w_tau(t) for every tau."""
    steps = 30
    model = nn.Linear(steps, 1, bias=False)
    profile = PowerEMA({"m": model}, sigma_rel=0.1)
    for tau in range(1, steps + 1):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, tau - 1] = 1.0
        profile.update({"m": model})
    got = profile.models["m"].weight[0].double().numpy()
    want = profile_weights(steps, profile.gamma, np.arange(1, steps + 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert want.sum() == pytest.approx(1.0) and int(profile.num_updates) == steps


def _random_walk_run(tmp_path, steps: int = 60, every: int = 10) -> PosthocEMA:
    """A plain module whose weights drift like training's, profiles updated each step, snapshotted every 10."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    posthoc = PosthocEMA({"unet": model}, SIGMAS, track=[TRACKED])
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 + 0.02)
            model[1].running_mean.fill_(step)
        posthoc.update({"unet": model})
        if step % every == 0:
            snapshot_profiles(tmp_path, posthoc, step)
    return posthoc


def _reconstruct(folder, sigma: float) -> tuple[dict[str, torch.Tensor], float]:
    used = list_snapshots(folder, "profile")
    basis = [(s.t, s.gamma) for s in used]
    target = (max(s.t for s in used), sigma_rel_to_gamma(sigma))
    x = solve_coefficients(basis, [target])[:, 0]
    return combine(used, x.tolist()), reconstruction_error(basis, target, x)


def test_reconstruction_at_own_and_tracked_length(tmp_path):
    posthoc = _random_walk_run(tmp_path)
    assert len(list_snapshots(tmp_path, "profile")) == 12 and len(list_snapshots(tmp_path, "tracked")) == 6
    meta = read_snapshot(next(tmp_path.glob("profile-sigma0.0500-step000000060*")))
    assert (meta.t, meta.step, meta.sigma_rel) == (60, 60, 0.05) and meta.gamma == pytest.approx(16.972, abs=1e-3)
    finals = [p.tensors()[0] for p in posthoc.profiles]

    own, own_error = _reconstruct(tmp_path, 0.05)
    assert own_error < 1e-6
    for key, value in finals[0].items():
        torch.testing.assert_close(own[key], value, rtol=1e-5, atol=1e-5, msg=key)

    tracked = posthoc.tracked[0].tensors()[0]
    solved, profile_error = _reconstruct(tmp_path, TRACKED)
    assert profile_error < 0.03, profile_error
    weight = [k for k in tracked if k.endswith("weight")]
    spread = sum((finals[0][k] - finals[1][k]).norm() ** 2 for k in weight) ** 0.5
    error = sum((solved[k] - tracked[k]).norm() ** 2 for k in weight) ** 0.5
    assert error < 0.10 * spread, (float(error), float(spread))
    # And the solve is not the nearer profile passed through: it lies between them.
    assert error < 0.5 * min(sum((f[k] - tracked[k]).norm() ** 2 for k in weight) ** 0.5 for f in finals)
    assert torch.equal(solved["unet.1.running_mean"], torch.full((16,), 60.0))  # buffers: the newest, not mixed
