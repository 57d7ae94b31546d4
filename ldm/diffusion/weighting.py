"""Per-timestep loss weights."""

from __future__ import annotations

import torch


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): clip the SNR of easy, low-noise steps so they stop dominating.

    Expressed for the model's own target: epsilon loss x min(SNR, g)/SNR, v loss x min(SNR, g)/(SNR + 1).
    gamma None or <= 0 gives uniform weights (the plain DDPM loss).
    """
    if not gamma or gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")
