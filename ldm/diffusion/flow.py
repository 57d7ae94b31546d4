"""Rectified flow (flow matching) as a "schedule": x_t = (1 - t) x0 + t noise, t in [0, 1].

It offers the same three methods as the discrete NoiseSchedule (coefficients, add_noise,
sample_timesteps) plus `model_time`, so the training step and the objectives do not care which
family they train. Timesteps are drawn logit-normal, which SD 3 (Esser et al. 2024) found to beat
uniform t by putting more weight on the middle of the path.
"""

from __future__ import annotations

import torch
from torch import nn


class FlowSchedule(nn.Module):
    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
                 time_scale: float = 1000.0):
        super().__init__()
        if logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"flow.shift must be > 0, got {shift}")
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift = shift
        # The UNet's sinusoidal embedding was designed for t in [0, 1000): feed it t * time_scale.
        self.time_scale = time_scale

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1 - t and sigma = t, shaped to broadcast over a tensor of `ndim` dims."""
        t = t.float().view(-1, *([1] * (ndim - 1)))
        return 1 - t, t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0.ndim)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        u = torch.randn(n, device=device, generator=generator) * self.logit_std + self.logit_mean
        return self.shift_time(torch.sigmoid(u))

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        """SD 3's resolution shift: shift > 1 spends more of the path at high noise."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * self.time_scale

    def sampling_times(self, steps: int) -> torch.Tensor:
        """steps + 1 times from 1 (pure noise) down to 0 (data), with the same shift as training."""
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        return self.shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()
