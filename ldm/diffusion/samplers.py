"""Samplers as plain functions of a denoiser callable; shared by validation and sample.py.

`model_fn(x_t, t) -> network output` (guidance, conditioning and dtype handling live in the callable).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ldm.diffusion.objectives import to_x0_eps
from ldm.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim",)


def classifier_free_guidance(model: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                             guidance_scale: float) -> ModelFn:
    """Wrap a conditional network: out = uncond + s * (cond - uncond), both halves in one batch."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return model(x, t, cond)
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    return fn


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced ("trailing") timesteps, last one num_train_timesteps - 1, descending."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {steps}")
    ts = torch.linspace(num_train_timesteps, 0, steps + 1).round().long()[:-1] - 1
    return ts.clamp(min=0).tolist()


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's variance."""
    abar = schedule.alphas_cumprod.to(x.device)
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress, leave=False)):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a_t)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = model_fn(x, tt).float()
        x0, eps = to_x0_eps(prediction_type, out, x.float(), a_t.sqrt(), (1 - a_t).sqrt())
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample(sampler: str, model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, **kwargs) -> torch.Tensor:
    if sampler == "ddim":
        return sample_ddim(model_fn, x, schedule, **kwargs)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
