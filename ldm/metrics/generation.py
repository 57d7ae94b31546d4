"""Generation quality in stage=ldm validation: FID against validation images and CLIP score against prompts.

Both are torchmetrics metrics, so each rank updates them with its own share of samples and compute()
synchronizes the states across ranks. FID keeps its real-image statistics across resets
(reset_real_features=False): the validation images are encoded once per run, not at every validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ldm.metrics.clip_score import build_clip_score
from ldm.metrics.fid import build_fid
from ldm.metrics.precision import float32_metrics

# Metric samples are seeded apart from validation's image grid (which uses val_seed + i): sample i of the metric
# set uses val_seed + METRIC_SEED_OFFSET + i, in training's validation and in `python -m ldm.evaluate` alike.
METRIC_SEED_OFFSET = 100_000


def rank_share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of sample indices rank `rank` draws: contiguous, the first ranks take the remainder, so
    the set of (index, seed) pairs over all ranks does not depend on the world size."""
    per, extra = divmod(total, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def metric_seeds(base: int, start: int, count: int) -> list[int]:
    """The seed of each of samples start .. start + count - 1: one seed per sample index."""
    return [base + start + i for i in range(count)]


def sample_and_score(generate: Callable[[list[str], list[int]], torch.Tensor], metrics: GenerationMetrics,
                     prompts: list[str], seeds: list[int], batch_size: int,
                     on_batch: Callable[[int, torch.Tensor, list[str]], None] | None = None) -> None:
    """The one sampling loop behind FID and CLIP score, for validation and `ldm.evaluate`: prompt i is drawn
    with seeds[i] by `generate(prompts, seeds) -> images in [-1, 1]` and fed to the metrics' generated side;
    `on_batch(offset, images, prompts)` sees each batch too (saving, prompt accuracy)."""
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[start:start + batch_size]
        images = generate(chunk, seeds[start:start + batch_size])
        metrics.update_generated(images, chunk)
        if on_batch is not None:
            on_batch(start, images, chunk)


def _enabled(section: dict[str, Any] | None) -> bool:
    return section is not None and section.get("enabled", True) is not False


class GenerationMetrics(nn.Module):
    def __init__(self, fid: dict[str, Any] | None = None, clip_score: dict[str, Any] | None = None):
        super().__init__()
        fid_kwargs = {k: v for k, v in (fid or {}).items() if k != "enabled"}
        clip_kwargs = {k: v for k, v in (clip_score or {}).items() if k != "enabled"}
        self.fid = build_fid(**fid_kwargs, reset_real_features=False) if _enabled(fid) else None
        self.clip_score = build_clip_score(**clip_kwargs) if _enabled(clip_score) else None
        self.has_real = False  # per run: the real statistics are kept once computed
        self.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self.fid is not None or self.clip_score is not None

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        """images in [-1, 1]. Metrics run in float32 under any training precision (ldm.metrics.precision)."""
        if self.fid is not None:
            with float32_metrics(images.device):
                self.fid.update(((images.float() + 1) / 2).clamp(0, 1), real=True)

    @torch.no_grad()
    def update_generated(self, images: torch.Tensor, prompts: list[str]) -> None:
        """images in [-1, 1] generated from `prompts`."""
        images = ((images.float() + 1) / 2).clamp(0, 1)
        with float32_metrics(images.device):
            if self.fid is not None:
                self.fid.update(images, real=False)
            if self.clip_score is not None:
                self.clip_score.update(images * 255, list(prompts))

    REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def real_statistics(self) -> dict[str, torch.Tensor]:
        """This rank's FID reference state (feature sum, outer-product sum, count): what a statistics file holds."""
        return {name: getattr(self.fid, name).detach().clone() for name in self.REAL_STATES}

    def load_real_statistics(self, stats: dict[str, torch.Tensor] | None) -> None:
        """Set the reference state; None zeroes it. The states are summed over ranks at compute(), so a
        statistics file goes into one rank and the others load None."""
        for name in self.REAL_STATES:
            state = getattr(self.fid, name)
            state.copy_(stats[name].to(state) if stats is not None else torch.zeros_like(state))
        self.has_real = True

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        metric = self.fid if self.fid is not None else self.clip_score
        with float32_metrics(metric.device if metric is not None else "cpu"):
            if self.fid is not None:
                out["fid"] = self.fid.compute()
            if self.clip_score is not None:
                out["clip_score"] = self.clip_score.compute()
        return out

    def reset(self) -> None:
        for metric in (self.fid, self.clip_score):
            if metric is not None:
                metric.reset()
