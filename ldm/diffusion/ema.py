"""Exponential moving average of model weights, kept as a plain module so checkpoints carry it."""

from __future__ import annotations

import copy
from typing import Any

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
        # A host copy of num_updates: reading the (CUDA) buffer every step would wait for all queued work.
        self._host_updates: int | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None  # re-read from the loaded buffer on next use

    def _updates(self) -> int:
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        return self._host_updates

    def current_decay(self) -> float:
        n = self._updates()
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def decay_tensor(self) -> torch.Tensor:
        """current_decay as a tensor on the buffers' device, computed there: logging it copies nothing per step."""
        n = self.num_updates.float()
        return torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # one fused pass instead of a Python loop
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self._host_updates = self._updates() + 1  # read before the increment below
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)
