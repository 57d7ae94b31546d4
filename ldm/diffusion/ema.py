"""Exponential moving average of model weights, kept as a plain module so checkpoints carry it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """decay_t = min(decay, (1 + n) / (10 + n)): a warm-up so early averages are not dominated by init."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # one fused pass instead of a Python loop
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)
