"""Reconstruction quality of the autoencoder: PSNR, SSIM, LPIPS and rFID as torchmetrics (synced across ranks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.autoencoder.lpips import LPIPS
from ldm.metrics.fid import build_fid
from ldm.metrics.precision import float32_metrics


class ReconstructionMetrics(nn.Module):
    """Accumulates over a validation epoch; images in [-1, 1].

    LPIPS is our LPIPS network (the published VGG16 + heads when pretrained) averaged by a torchmetrics
    MeanMetric: torchmetrics' own LPIPS class would download its weights at construction.
    """

    def __init__(self, fid: dict[str, Any] | None = None, lpips: LPIPS | None = None, lpips_pretrained: bool = False,
                 lpips_weights_path: str | None = None):
        super().__init__()
        self.psnr = PeakSignalNoiseRatio(data_range=(-1.0, 1.0))
        self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.lpips_mean = MeanMetric()
        # Share the loss's LPIPS network when there is one; keep it out of this module's parameters then.
        self._shared_lpips = [lpips] if lpips is not None else []
        self.lpips = None if lpips is not None else LPIPS(pretrained=lpips_pretrained, weights_path=lpips_weights_path)
        self.fid = build_fid(**fid) if fid is not None and fid.get("enabled", True) is not False else None
        if self.fid is not None:
            self.fid.inception.requires_grad_(False)

    def _lpips_net(self) -> LPIPS:
        return self._shared_lpips[0] if self._shared_lpips else self.lpips

    @torch.no_grad()
    def update(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """In float32 under any training precision (see ldm.metrics.precision)."""
        images, recon = images.float(), recon.float().clamp(-1.0, 1.0)
        with float32_metrics(images.device):
            self.psnr.update(recon, images)
            self.ssim.update(recon, images)
            self.lpips_mean.update(self._lpips_net()(images, recon).float())
            if self.fid is not None:
                self.fid.update((images + 1) / 2, real=True)
                self.fid.update((recon + 1) / 2, real=False)

    def compute(self) -> dict[str, torch.Tensor]:
        with float32_metrics(self.psnr.device):
            out = {"psnr": self.psnr.compute(), "ssim": self.ssim.compute(), "lpips": self.lpips_mean.compute()}
            if self.fid is not None:
                try:  # the count check happens after the cross-rank sync, so every rank takes the same branch
                    out["rfid"] = self.fid.compute()
                except RuntimeError as err:
                    if "More than one sample" not in str(err):
                        raise
        return out

    def reset(self) -> None:
        for metric in (self.psnr, self.ssim, self.lpips_mean, self.fid):
            if metric is not None:
                metric.reset()
