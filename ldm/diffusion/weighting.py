"""Per-timestep loss weights."""

from __future__ import annotations

import torch


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): clip the SNR of easy, low-noise steps so they stop dominating.

    Expressed for the model's own target so that the weight on the x0 error is min(SNR, g) in every case:
    epsilon loss x min(SNR, g)/SNR, v loss x min(SNR, g)/(SNR + 1), flow velocity loss x sigma^2 min(SNR, g)
    (the x0 error is sigma times the velocity error on the straight path).
    gamma None or <= 0 gives uniform weights (the plain DDPM loss).
    """
    if not gamma or gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "flow":
        return clipped / (snr.sqrt() + 1) ** 2  # sigma^2 = 1 / (1 + alpha/sigma)^2 on the straight path
    raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")
