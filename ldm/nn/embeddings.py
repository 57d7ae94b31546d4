"""Timestep embeddings."""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first.

    This is the CompVis LDM convention, equal to diffusers' `Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)` used by every SD 1.x/2.x UNet; the frequencies are computed in the same
    order of operations so converted checkpoints see the same inputs.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
