"""Samplers as plain functions of a denoiser callable; shared by validation and sample.py.

`model_fn(x_t, t) -> network output` (guidance, conditioning and dtype handling live in the callable).
DDPM, DDIM and DPM-Solver++ integrate the discrete diffusion schedule (epsilon / v_prediction models);
Euler and Heun integrate the flow ODE dx/dt = v (prediction_type=flow); euler_ancestral is its stochastic
counterpart. The stochastic samplers (ddpm, euler_ancestral) take `generator`: one torch.Generator, or one
per sample so that a sample's image does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.objectives import to_x0_eps
from ldm.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None
DIFFUSION_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
FLOW_SAMPLERS = ("euler", "heun", "euler_ancestral")
SAMPLERS = DIFFUSION_SAMPLERS + FLOW_SAMPLERS


def check_sampler(sampler: str, prediction_type: str) -> None:
    """A flow model needs a flow sampler and a diffusion model a diffusion one; say which, by name."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    allowed = FLOW_SAMPLERS if prediction_type == "flow" else DIFFUSION_SAMPLERS
    if sampler not in allowed:
        raise ValueError(f"sampler={sampler!r} does not fit prediction_type={prediction_type!r}; "
                         f"use one of {allowed}")


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """None, or (lo, hi) with 0 <= lo < hi <= 1 in normalized time (1: pure noise)."""
    if interval is None:
        return None
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1 (1: pure noise), got {interval}")
    return values


def classifier_free_guidance(model: Callable[..., torch.Tensor], cond: torch.Tensor | None,
                             uncond: torch.Tensor | None,
                             guidance_scale: float, interval: Sequence[float] | None = None,
                             time_scale: float = 1000.0) -> ModelFn:
    """Wrap a conditional network: out = uncond + s * (cond - uncond), both halves in one batch.

    With `interval` = (lo, hi), guidance applies only while t / time_scale lies in it; elsewhere the
    conditional output alone is used (one network call). Kynkaanniemi et al. 2024 found guidance at the
    highest noise levels harms samples; on the shapes recipe (0.1, 0.9) drew more well-formed shapes.
    """
    window = check_guidance_interval(interval)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cond is None:  # unconditional model: nothing to guide
            return model(x, t, None)
        outside = window is not None and not window[0] <= float(t.reshape(-1)[0]) / time_scale <= window[1]
        if guidance_scale == 1.0 or outside:
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


def _predict(model_fn: ModelFn, x: torch.Tensor, t: int, abar_t: torch.Tensor,
             prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One network call turned into (x0, eps) in float32, so every sampler sees the same parametrisation."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = model_fn(x, tt).float()
    return to_x0_eps(prediction_type, out, x.float(), abar_t.sqrt(), (1 - abar_t).sqrt())


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                prediction_type: str = "epsilon", generator: Generators = None,
                progress: bool = False, **_: object) -> torch.Tensor:
    """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's variance."""
    abar = schedule.alphas_cumprod.to(x.device)
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress, leave=False)):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a_t)
        x0, eps = _predict(model_fn, x, t, a_t, prediction_type)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * fresh_noise(x, generator)
    return x


def fresh_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x: from one generator, or row i from generator[i]."""
    if isinstance(generator, list | tuple):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]
        return torch.stack(rows).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50,
                prediction_type: str = "epsilon", generator: Generators = None,
                progress: bool = False, **_: object) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020) on strided timesteps.

    Striding uses the effective beta 1 - abar_t / abar_prev, so the same code serves steps < T; the last step
    goes to abar = 1, where the posterior collapses onto the x0 prediction and no noise is added.
    """
    abar = schedule.alphas_cumprod.to(x.device)
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    x = x.float()
    for i, t in enumerate(tqdm(ts, desc="ddpm", disable=not progress, leave=False)):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a_t)
        x0, _eps = _predict(model_fn, x, t, a_t, prediction_type)
        beta = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_t)
        if i + 1 < len(ts):
            var = (1 - a_prev) / (1 - a_t) * beta
            mean = mean + var.sqrt() * fresh_noise(x, generator)
        x = mean
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 20,
                    prediction_type: str = "epsilon", progress: bool = False, **_: object) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic multistep solver of the probability-flow ODE.

    Works in data prediction with lambda = log(alpha / sigma); exact integration of the linear part makes
    it accurate at 10-25 steps. The first step has no history and the last one lands on sigma = 0 (where
    the exact update is just the x0 prediction), so both are first order, as in diffusers with
    final_sigmas_type="zero".
    """
    abar = schedule.alphas_cumprod.to(x.device)
    abar64 = schedule.alphas_cumprod.detach().cpu().double()  # step coefficients as python floats, any device
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    x = x.float()
    x0_prev: torch.Tensor | None = None
    h_prev = 0.0
    for i, t in enumerate(tqdm(ts, desc="dpmpp_2m", disable=not progress, leave=False)):
        x0, _eps = _predict(model_fn, x, t, abar[t], prediction_type)
        if i + 1 == len(ts):
            return x0
        a_s, a_t = abar64[t], abar64[ts[i + 1]]
        lam_s = 0.5 * (a_s.log() - (1 - a_s).log())
        lam_t = 0.5 * (a_t.log() - (1 - a_t).log())
        h = float(lam_t - lam_s)
        ratio = float(((1 - a_t) / (1 - a_s)).sqrt())  # sigma_t / sigma_s
        phi = float(a_t.sqrt()) * -math.expm1(-h)  # alpha_t * (1 - e^-h)
        d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
        x = ratio * x + phi * d
        x0_prev, h_prev = x0, h
    return x


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, schedule: FlowSchedule) -> torch.Tensor:
    tt = schedule.model_time(t.to(x.device)).expand(x.shape[0])
    return model_fn(x, tt).float()


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: torch.Tensor, schedule: FlowSchedule, steps: int = 28,
                 progress: bool = False, **_: object) -> torch.Tensor:
    """Euler steps of dx/dt = v from t = 1 (noise) to t = 0 (data): one network call per step."""
    times = schedule.sampling_times(steps)
    x = x.float()
    for i in tqdm(range(steps), desc="euler", disable=not progress, leave=False):
        x = x + float(times[i + 1] - times[i]) * _velocity(model_fn, x, times[i], schedule)
    return x


@torch.no_grad()
def sample_heun(model_fn: ModelFn, x: torch.Tensor, schedule: FlowSchedule, steps: int = 28,
                progress: bool = False, **_: object) -> torch.Tensor:
    """Heun's method (Karras et al. 2022): an Euler guess corrected by the slope at its end point; second
    order for two calls per step. Unlike a diffusion ODE in sigma, the velocity is finite at t = 0, so the
    last step is corrected too."""
    times = schedule.sampling_times(steps)
    x = x.float()
    for i in tqdm(range(steps), desc="heun", disable=not progress, leave=False):
        dt = float(times[i + 1] - times[i])
        v = _velocity(model_fn, x, times[i], schedule)
        v_end = _velocity(model_fn, x + dt * v, times[i + 1], schedule)
        x = x + dt * 0.5 * (v + v_end)
    return x


@torch.no_grad()
def sample_euler_ancestral(model_fn: ModelFn, x: torch.Tensor, schedule: FlowSchedule, steps: int = 28,
                           generator: Generators = None, progress: bool = False, **_: object) -> torch.Tensor:
    """Stochastic Euler on the straight path: split x_t into its predicted data and noise, then re-noise the
    data prediction to the next time with fresh noise.

    On a model that is still learning, the fresh noise lets later steps repair what earlier ones got wrong,
    where the ODE (euler, heun) carries every error to the end (Karras et al. 2022, on stochastic sampling):
    bench/learning_curve.py measured more well-formed shapes with it on the shapes recipe (docs/results.md).
    With the noise prediction kept instead of fresh noise, a step is exactly `euler`'s.
    """
    times = schedule.sampling_times(steps)
    x = x.float()
    for i in tqdm(range(steps), desc="euler_ancestral", disable=not progress, leave=False):
        t, t_next = float(times[i]), float(times[i + 1])
        v = _velocity(model_fn, x, times[i], schedule)
        x0 = x - t * v  # x_t = (1 - t) x0 + t noise and v = noise - x0
        x = x0 if t_next == 0 else (1 - t_next) * x0 + t_next * fresh_noise(x, generator)
    return x


_SAMPLER_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler, "heun": sample_heun, "euler_ancestral": sample_euler_ancestral}


def sample(sampler: str, model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule | FlowSchedule,
           prediction_type: str = "epsilon", **kwargs) -> torch.Tensor:
    """Dispatch by name; kwargs a sampler has no use for (eta for dpmpp_2m, ...) are ignored."""
    check_sampler(sampler, prediction_type)
    return _SAMPLER_FNS[sampler](model_fn, x, schedule, prediction_type=prediction_type, **kwargs)
