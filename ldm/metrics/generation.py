"""Generation quality in stage=ldm validation: FID against validation images and CLIP score against prompts.

Both are torchmetrics metrics, so each rank updates them with its own share of samples and compute()
synchronizes the states across ranks. FID keeps its real-image statistics across resets
(reset_real_features=False): the validation images are encoded once per run, not at every validation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.metrics.clip_score import build_clip_score
from ldm.metrics.fid import build_fid
from ldm.metrics.precision import float32_metrics


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
