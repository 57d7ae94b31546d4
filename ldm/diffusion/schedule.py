"""Discrete noise schedules: one object shared by training (adding noise) and sampling."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.diffusion.flow import FlowSchedule

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {kind!r}; choose one of {BETA_SCHEDULES}")


# The last timestep's abar after zero-terminal-SNR rescaling: not exactly 0, so log-SNR samplers stay finite.
ZERO_SNR_ABAR = 2.0**-24


def rescale_zero_terminal_snr_fn(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": shift and scale
    sqrt(abar) so the last timestep is pure noise (SNR 0) while the first keeps its value."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


class NoiseSchedule(nn.Module):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for t in [0, num_train_timesteps)."""

    def __init__(self, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, rescale_zero_terminal_snr: bool = False):
        super().__init__()
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.num_train_timesteps = num_train_timesteps
        self.zero_terminal_snr = rescale_zero_terminal_snr
        abar = torch.cumprod(1 - betas, 0)
        if rescale_zero_terminal_snr:
            abar = rescale_zero_terminal_snr_fn(abar)
            abar[-1] = ZERO_SNR_ABAR
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over a tensor of `ndim` dims."""
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, *([1] * (ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0.ndim)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), device=device, generator=generator)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is told: the integer step itself (CompVis / diffusers convention)."""
        return t


def build_schedule(prediction_type: str, schedule: dict | None = None, flow: dict | None = None
                   ) -> NoiseSchedule | FlowSchedule:
    """The discrete schedule for epsilon / v_prediction, the flow path for prediction_type=flow."""
    if prediction_type == "flow":
        return FlowSchedule(**(flow or {}))
    return NoiseSchedule(**(schedule or {}))
