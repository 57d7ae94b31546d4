"""Parameterizations: what the network predicts, and how to read x0 and eps back from its output."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
    """Regression target for x_t = alpha x0 + sigma noise.

    alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) for the diffusion objectives; alpha = 1 - t, sigma = t
    for flow, whose target is the velocity dx_t/dt = noise - x0 (Lipman et al. 2023; Liu et al. 2023).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":  # Salimans & Ho 2022
        return alpha * noise - sigma * x0
    if prediction_type == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def to_x0_eps(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
              sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if prediction_type == "epsilon":
        eps = output
        return (x_t - sigma * eps) / alpha, eps
    if prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * output
        return x0, sigma * x_t + alpha * output
    if prediction_type == "flow":  # x_t = (1 - t) x0 + t eps and v = eps - x0
        return x_t - sigma * output, x_t + alpha * output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
