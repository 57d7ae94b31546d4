"""Power-function EMA (Karras et al. 2024, EDM2 "Analyzing and Improving the Training Dynamics", sec. 3):
profiles kept during training, from whose snapshots an EMA of any length is solved for after training.

A profile with exponent gamma averages with beta_t = (1 - 1/t)^(gamma + 1) at its t-th update. Unrolled, the
snapshot at step t weighs the weights after step tau (1 <= tau <= t) by

    w_tau(t) = (tau / t)^(gamma + 1) - ((tau - 1) / t)^(gamma + 1),

which telescopes, so they sum to 1 and the initial weights weigh nothing. The length is quoted as sigma_rel,
the profile's standard deviation over its own age: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

A target profile (step t*, gamma*) is the least-squares combination of the snapshot profiles: the normal
equations of their inner products, G x = b. EDM2 uses the continuous profiles' closed-form inner products;
here they are summed exactly over the discrete steps, so a reconstruction of a run of a few hundred steps is
as exact as one of a million.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has this relative width: the largest real root of a cubic (EDM2 eq. 3)."""
    if not 0.0 < sigma_rel < 12 ** -0.5:  # gamma -> -1 gives 1/sqrt(12); the profile is then a flat average
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(t: int, gamma: float) -> float:
    """The decay of a profile's t-th update (t >= 1); 0 at t = 1, so the first average is the weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class PowerEMA(nn.Module):
    """One power-function profile of a set of modules (the UNet, and a trained conditioner beside it)."""

    def __init__(self, models: dict[str, nn.Module], sigma_rel: float):
        super().__init__()
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self.models = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in models.items()})
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None  # as in EMA: no device read per step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None

    def updates(self) -> int:
        """How many updates this profile has seen: its t (one host read after a load, then a host counter)."""
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        return self._host_updates

    @torch.no_grad()
    def update(self, models: dict[str, nn.Module]) -> None:
        t = self.updates() + 1
        weight = 1.0 - power_beta(t, self.gamma)  # a host float from a host int
        for name, copy_ in self.models.items():
            averaged = list(copy_.parameters())
            params = [p.detach().to(e.dtype) for p, e in zip(models[name].parameters(), averaged, strict=True)]
            torch._foreach_lerp_(averaged, params, weight)
            for e, b in zip(copy_.buffers(), models[name].buffers(), strict=True):
                e.copy_(b)
        self._host_updates = t
        self.num_updates += 1

    def tensors(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The averaged state as flat "<model>.<key>" tensors, and which of them are buffers (copied, not averaged)."""
        state, buffers = {}, []
        for name, model in self.models.items():
            buffer_names = {k for k, _ in model.named_buffers()}
            for key, value in model.state_dict().items():
                state[f"{name}.{key}"] = value
                if key in buffer_names:
                    buffers.append(f"{name}.{key}")
        return state, buffers

    def train(self, mode: bool = True) -> PowerEMA:
        return super().train(False)


class PosthocEMA(nn.Module):
    """The profiles a run keeps (`sigma_rels`, snapshotted for reconstruction) and, opt-in, `track`: profiles of
    other lengths kept directly, to measure how well a reconstruction matches the EMA it stands for."""

    def __init__(self, models: dict[str, nn.Module], sigma_rels: Sequence[float], track: Sequence[float] = ()):
        super().__init__()
        if not sigma_rels:
            raise ValueError("model.posthoc_ema.sigma_rels: give at least one profile length, e.g. [0.05, 0.10]")
        self.profiles = nn.ModuleList(PowerEMA(models, s) for s in sigma_rels)
        self.tracked = nn.ModuleList(PowerEMA(models, s) for s in track)

    def update(self, models: dict[str, nn.Module]) -> None:
        for profile in (*self.profiles, *self.tracked):
            profile.update(models)


# ---------------------------------------------------------------------------------------------- reconstruction
def profile_weights(t: int, gamma: float, taus: np.ndarray) -> np.ndarray:
    """w_tau(t) of the module docstring at steps `taus` (0 where tau > t), in float64."""
    taus = taus.astype(np.float64)
    inside = taus <= t
    hi = np.where(inside, taus / t, 0.0)
    lo = np.where(inside, (taus - 1.0) / t, 0.0)
    return hi ** (gamma + 1.0) - lo ** (gamma + 1.0)


def inner_products(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]], chunk: int = 1 << 16
                   ) -> np.ndarray:
    """<profile_i, profile_j> for (t, gamma) pairs, summed exactly over steps 1..max t in chunks (memory bound)."""
    horizon = max(t for t, _ in (*a, *b))
    out = np.zeros((len(a), len(b)))
    for start in range(1, horizon + 1, chunk):
        taus = np.arange(start, min(start + chunk, horizon + 1))
        wa = np.stack([profile_weights(t, g, taus) for t, g in a])
        wb = np.stack([profile_weights(t, g, taus) for t, g in b])
        out += wa @ wb.T
    return out


def solve_coefficients(snapshots: Sequence[tuple[int, float]], targets: Sequence[tuple[int, float]]) -> np.ndarray:
    """Least-squares coefficients (len(snapshots) x len(targets)): target_j ~ sum_i x_ij snapshot_i."""
    gram = inner_products(snapshots, snapshots)
    rhs = inner_products(snapshots, targets)
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:  # two identical snapshot profiles (the same step written twice)
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def reconstruction_error(snapshots: Sequence[tuple[int, float]], target: tuple[int, float],
                         coefficients: np.ndarray) -> float:
    """||sum_i x_i w_i - w_target|| / ||w_target|| over steps: how far the solved profile is from the one asked."""
    gram = inner_products(snapshots, snapshots)
    cross = inner_products(snapshots, [target])[:, 0]
    own = inner_products([target], [target])[0, 0]
    x = np.asarray(coefficients, dtype=np.float64)
    err2 = x @ gram @ x - 2 * x @ cross + own
    return float(math.sqrt(max(err2, 0.0) / own))
