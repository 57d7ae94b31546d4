"""Post-hoc EMA (EDM2 power-function profiles): the math on a plain module, then the wiring through train.py.

Stated tolerance of a reconstruction at a length no profile has: the solved weights differ from the directly
tracked EMA of that length by at most 10% of the distance between the two snapshotted profiles' own weights
(the profile-level error of that solve is 2%, reconstruction_error below; the weights measured 4.3%).
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


def test_resume_keeps_only_the_snapshots_it_descends_from(tmp_path):
    from ldm.checkpoints.ema_snapshots import carry_over, prune_after

    old, new = tmp_path / "old", tmp_path / "new"
    _random_walk_run(old, steps=30)
    copied = carry_over(old, new, step=20)
    assert sorted({s.step for s in list_snapshots(new)}) == [10, 20] and len(copied) == 6
    assert (new / copied[0].name).read_bytes() == (old / copied[0].name).read_bytes()
    removed = prune_after(old, step=20)
    assert len(removed) == 3 and sorted({s.step for s in list_snapshots(old)}) == [10, 20]


# ---------------------------------------------------------------------------------------------- through train.py
PIXEL = ["logger=csv", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "data.resolution=16",
         "data.batch_size=4", "data.num_workers=2", "model/autoencoder=identity", "model.unet.model_channels=16",
         "model.unet.num_head_channels=8", "model.text_encoder.width=32", "paths.runs=runs",
         "checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=0",
         f"model.posthoc_ema.sigma_rels=[{SIGMAS[0]},{SIGMAS[1]}]", f"model.posthoc_ema.track=[{TRACKED}]",
         "model.posthoc_ema.snapshot_every=2"]


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _only(folder, role: str, sigma: float, step: int):
    return folder / f"{role}-sigma{sigma:.4f}-step{step:09d}.safetensors"


@pytest.mark.usefixtures("one_thread")
def test_train_reconstruct_resume_and_sample(tmp_path, tiny_shapes):
    data = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    run_script("train.py", "stage=ldm", *PIXEL, *data, "trainer.max_steps=5", cwd=tmp_path)
    (run,) = (tmp_path / "runs" / "ldm").iterdir()
    snaps = run / "posthoc_ema"
    # Every 2 steps and at the end (step 5), each profile and the tracked one.
    assert sorted({s.step for s in list_snapshots(snaps)}) == [2, 4, 5]
    assert len(list_snapshots(snaps, "profile")) == 6 and len(list_snapshots(snaps, "tracked")) == 3

    # Resumed from step 4 into a new run dir: the old run's snapshots up to 4 come along, the end is the same.
    ckpt = run / "checkpoints" / "step0000004.ckpt"
    run_script("train.py", "stage=ldm", *PIXEL, *data, "trainer.max_steps=5", f"ckpt={ckpt}",
               "hydra.run.dir=runs/resumed", cwd=tmp_path)
    resumed = tmp_path / "runs" / "resumed" / "posthoc_ema"
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in snaps.iterdir())
    for path in snaps.iterdir():
        a, b = _tensors(path), _tensors(resumed / path.name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{path.name}: {key}")
    from ldm.checkpoints.files import load_torch_file

    straight = load_torch_file(run / "checkpoints" / "step0000005.ckpt")
    again = load_torch_file(tmp_path / "runs" / "resumed" / "checkpoints" / "step0000005.ckpt")
    profiles = [k for k in straight["state_dict"] if k.startswith("posthoc_ema.")]
    assert any(k.endswith("num_updates") for k in profiles) and straight["posthoc_ema_sigma_rels"] == {
        "sigma_rels": SIGMAS, "track": [TRACKED]}
    for key in profiles:
        torch.testing.assert_close(again["state_dict"][key], straight["state_dict"][key], rtol=1e-5, atol=1e-6,
                                   msg=key)

    out = tmp_path / "reconstructed"
    from ldm.ema_reconstruct import main as reconstruct_main

    assert reconstruct_main([str(run), f"sigma_rel=[{SIGMAS[0]},{TRACKED}]", f"out={out}"]) == 0
    own = _tensors(_only(snaps, "profile", SIGMAS[0], 5))
    tracked = _tensors(_only(snaps, "tracked", TRACKED, 5))
    other = _tensors(_only(snaps, "profile", SIGMAS[1], 5))
    for sigma, want in ((SIGMAS[0], own), (TRACKED, tracked)):
        export = out / f"sigma_rel_{sigma:.4f}"
        unet, text = _tensors(export / "unet_ema.safetensors"), _tensors(export / "text_encoder.safetensors")
        solved = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}}
        assert solved.keys() == want.keys()
        if sigma == SIGMAS[0]:  # its own length: that profile's final weights
            for key, value in want.items():
                torch.testing.assert_close(solved[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:  # the stated tolerance (module docstring), on the UNet and text weights together
            floats = [k for k in want if want[k].is_floating_point()]
            error = sum((solved[k] - want[k]).double().norm() ** 2 for k in floats) ** 0.5
            spread = sum((own[k] - other[k]).double().norm() ** 2 for k in floats) ** 0.5
            assert error < 0.10 * spread, (float(error), float(spread))
        info = json.loads((export / "posthoc_ema.json").read_text())
        assert info["step"] == 5 and len(info["snapshots"]) == 6
    # step=4: the EMA as of step 4, from the snapshots up to it; at a profile's own length, that snapshot.
    assert reconstruct_main([str(run), f"sigma_rel={SIGMAS[1]}", "step=4", f"out={tmp_path / 'at4'}"]) == 0
    at4 = _tensors(tmp_path / "at4" / f"sigma_rel_{SIGMAS[1]:.4f}" / "unet_ema.safetensors")
    for key, value in _tensors(_only(snaps, "profile", SIGMAS[1], 4)).items():
        if key.startswith("unet."):
            torch.testing.assert_close(at4[key[len("unet."):]], value, rtol=1e-5, atol=1e-6, msg=key)
    assert reconstruct_main([str(tmp_path), "sigma_rel=0.07"]) == 2  # no snapshots there: a message, no traceback
    # sample.py takes a reconstruction like any export.
    samples = tmp_path / "samples"
    run_script("sample.py", f"ckpt={out / 'sigma_rel_0.0700'}", "prompt=a red circle", "num_images=1", "steps=2",
               f"out={samples}", cwd=tmp_path)
    assert (samples / "00000.png").exists()


def test_bad_settings_fail_at_start(tmp_path):
    from tests.ldm_factory import tiny_ldm

    with pytest.raises(ValueError, match="model.posthoc_ema.snapshot_every"):
        tiny_ldm(posthoc_ema={"sigma_rels": [0.05], "snapshot_every": 0})
    with pytest.raises(ValueError, match="model.posthoc_ema: unknown keys"):
        tiny_ldm(posthoc_ema={"sigma_rels": [0.05], "snapshot_every": 2, "sigma": 1})
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        tiny_ldm(posthoc_ema={"sigma_rels": [0.9], "snapshot_every": 2})
    proc = run_script("train.py", "stage=ldm", "--cfg", "job", cwd=tmp_path)  # off by default
    assert "sigma_rels: []" in proc.stdout
    assert ROOT.joinpath("docs", "posthoc_ema.md").is_file()


def test_profile_updates_read_nothing_to_the_host(tmp_path, tiny_shapes, monkeypatch, one_thread):
    """The profiles' per-step update adds no host read or collective (tests/test_host_sync.py's counter)."""
    from ldm.autoencoder.model import AutoencoderKL
    from tests.test_host_sync import _check, _train

    torch.manual_seed(0)
    AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=16,
                  norm_num_groups=4).save_pretrained(tmp_path / "exports" / "autoencoder")
    counter = _train(tmp_path, monkeypatch, "stage=ldm", f"data.train_shards={tiny_shapes}/train",
                     f"data.val_shards={tiny_shapes}/val", "paths.exports=exports", "stage.module.scale_factor=1.0",
                     "model.posthoc_ema.sigma_rels=[0.05,0.1]", "model.posthoc_ema.snapshot_every=1000")
    _check(counter, "ldm with post-hoc EMA")
    assert len(list_snapshots(tmp_path / "run" / "posthoc_ema")) == 2  # the end of training's
