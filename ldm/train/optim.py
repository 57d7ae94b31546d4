"""Optimizer and learning-rate schedule shared by both stages."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def adamw_with_warmup(params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float, warmup_steps: int = 0,
                      betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                      fused: bool | None = None, name: str = "lr", decay_start: int | None = None,
                      decay_end: int | None = None, min_lr_factor: float = 0.0) -> dict:
    """AdamW with a linear warm-up; returns Lightning's optimizer dict (scheduler stepped per batch).

    `params` may be parameter groups (dicts with "params" and their own "lr"): the warm-up scales each group's lr.
    With `decay_start` and `decay_end` the lr then falls linearly from the peak to `min_lr_factor` x peak over
    those steps and stays there (warm-up, stable, decay): a fixed-budget run ends on settled weights instead of
    wherever the last noisy steps left them.
    """
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    flat = [p for g in groups for p in g["params"]]
    # The fused kernel is one pass over all parameters (measured about 10% of a tiny model's CPU step); it needs
    # plain dense floating tensors on CPU or CUDA, so anything else (e.g. sharded DTensors) keeps the default.
    # fused=False is the caller's veto (e.g. AMP GradScaler with gradient clipping needs unfused AdamW).
    fused = (fused is not False) and all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in flat)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)
    factor = lr_factor(max(int(warmup_steps), 0), decay_start, decay_end, min_lr_factor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": name}}


def check_lr_decay(decay_start: int | None, decay_end: int | None, min_lr_factor: float) -> None:
    """Refuse a decay window that would silently do nothing or run backwards."""
    if (decay_start is None) != (decay_end is None):
        raise ValueError(f"lr decay needs both lr_decay_start and lr_decay_end (got {decay_start}, {decay_end})")
    if decay_start is not None and not 0 <= int(decay_start) < int(decay_end):
        raise ValueError(f"lr decay window must satisfy 0 <= lr_decay_start < lr_decay_end, got "
                         f"[{decay_start}, {decay_end}]")
    _check_min_lr_factor(min_lr_factor)


def lr_factor(warmup: int, decay_start: int | None = None, decay_end: int | None = None,
              min_lr_factor: float = 0.0) -> Callable[[int], float]:
    """The multiplier of the peak lr at each optimizer step (what LambdaLR calls)."""
    check_lr_decay(decay_start, decay_end, min_lr_factor)

    def factor(step: int) -> float:
        value = min(1.0, (step + 1) / (warmup + 1))
        if decay_start is not None and step >= decay_start:
            frac = min(1.0, (step - decay_start) / (decay_end - decay_start))
            value *= 1.0 - frac * (1.0 - min_lr_factor)
        return value

    return factor


def check_decay_fraction(fraction: float, end: int | None, min_lr_factor: float) -> None:
    """Refuse a decay that would do nothing sensible (checked at start-up, before any training)."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"lr_decay_fraction must be in [0, 1] (the share of the step budget spent decaying), "
                         f"got {fraction}")
    if end is not None and int(end) < 1:
        raise ValueError(f"lr_decay_end must be a positive step count, got {end}")
    _check_min_lr_factor(min_lr_factor)


def _check_min_lr_factor(min_lr_factor: float) -> None:
    if not 0.0 <= float(min_lr_factor) <= 1.0:
        raise ValueError(f"min_lr_factor must be in [0, 1], got {min_lr_factor}")


def clip_gradients(module: Any, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str = "norm") -> None:
    """Clip as Lightning would, also for a fused AdamW under bf16-mixed.

    Lightning's AMP plugin refuses to clip for any fused optimizer, since with a GradScaler the optimizer would
    unscale inside its step. bf16-mixed has no scaler: the gradients are already the true ones, so torch clips
    them here (on the device, no host read). Under 16-mixed the scaler is real and the caller keeps AdamW
    unfused (`fused=False` in adamw_with_warmup); other plugins (32-bit, FSDP's) go through Lightning.
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    plugin = module.trainer.precision_plugin
    fused = bool(optimizer.defaults.get("fused"))
    if isinstance(plugin, MixedPrecision) and getattr(plugin, "scaler", None) is None and fused:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if str(algorithm) in ("value", "GradClipAlgorithmType.VALUE"):
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
