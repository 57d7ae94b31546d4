"""Validation loss by noise level: the same number at every step, on any world size, after any resume.

Every validation sample is scored at K timesteps, the midpoints of K equal-probability buckets of training's
own timestep distribution (uniform steps for epsilon / v, logit-normal t in [0, 1] for flow), with noise drawn
from a generator seeded by the sample's key. So a sample's errors depend on the weights and the sample alone,
not on its batch, its rank or the batch index; their mean over the buckets is a K-point quadrature of the
expected (unweighted) denoising error, and each bucket's mean is the loss at that noise level.
"""

from __future__ import annotations

import hashlib

import torch

from ldm.diffusion.flow import FlowSchedule


def quantile_timesteps(schedule: torch.nn.Module, buckets: int) -> tuple[torch.Tensor, list[str]]:
    """The K midpoint timesteps and a name per bucket (the t range it covers, e.g. "t000-199", "t0.00-0.27")."""
    if buckets < 1:
        raise ValueError(f"stage.module.val_loss_buckets must be >= 1, got {buckets}")
    edges = torch.linspace(0.0, 1.0, buckets + 1, dtype=torch.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    if isinstance(schedule, FlowSchedule):  # the logit-normal's quantiles, then the same shift as training
        def quantile(u: torch.Tensor) -> torch.Tensor:
            z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)) * schedule.logit_std + schedule.logit_mean
            return schedule.shift_time(torch.sigmoid(z))

        bounds = quantile(edges)
        bounds[0], bounds[-1] = 0.0, 1.0
        names = [f"t{lo:.2f}-{hi:.2f}" for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]
        return quantile(mids).float(), names
    steps = schedule.num_train_timesteps
    lo = (edges[:-1] * steps).floor().long()
    hi = (edges[1:] * steps).floor().long() - 1
    width = len(str(steps - 1))
    names = [f"t{a:0{width}d}-{b:0{width}d}" for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    return (mids * steps).floor().long().clamp(max=steps - 1), names


def key_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed from (seed, sample key): Python's hash() changes between processes."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One standard normal sample of `shape` per key (on the CPU, float32): the same noise wherever it runs."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(seed, k)))
                        for k in keys])
