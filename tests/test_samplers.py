"""Samplers: agreement with diffusers' reference schedulers, exactness on toy data, seeding, dispatch."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.samplers import (
    DIFFUSION_SAMPLERS,
    ddim_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from ldm.diffusion.schedule import NoiseSchedule

torch.set_num_threads(1)  # the machine's other cores are busy; these tests are tiny anyway

SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule("scaled_linear")


def linear_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, deterministic stand-in for a network: linear in x plus a smooth t-dependent offset."""
    w = torch.linspace(-1, 1, x[0].numel()).view(x.shape[1:])
    return 0.1 * x + 0.05 * torch.sin(t.float() / 150).view(-1, 1, 1, 1) * w


def run_diffusers(scheduler, steps: int, x: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x = scheduler.step(linear_model(x, tt), t, x).prev_sample
    return x


def diffusers_kwargs(pred: str) -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=pred, timestep_spacing="trailing")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers(schedule, steps, pred):
    from diffusers import DPMSolverMultistepScheduler

    ref_sched = DPMSolverMultistepScheduler(**diffusers_kwargs(pred), algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero", lower_order_final=True)
    ref_sched.set_timesteps(steps)
    assert ref_sched.timesteps.tolist() == ddim_timesteps(1000, steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = run_diffusers(ref_sched, steps, noise.clone())
    ours = sample_dpmpp_2m(linear_model, noise.clone(), schedule, steps=steps, prediction_type=pred)
    diff = (ours - ref).abs().max().item()
    print(f"dpmpp_2m steps={steps} {pred}: max abs diff {diff:.2e} (|ref|max {ref.abs().max():.2f})")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20])
def test_ddim_matches_diffusers(schedule, steps, pred):
    from diffusers import DDIMScheduler

    # set_alpha_to_one: our last step also goes to abar = 1
    ref_sched = DDIMScheduler(**diffusers_kwargs(pred), set_alpha_to_one=True, clip_sample=False)
    ref_sched.set_timesteps(steps)
    assert ref_sched.timesteps.tolist() == ddim_timesteps(1000, steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref = run_diffusers(ref_sched, steps, noise.clone())
    ours = sample_ddim(linear_model, noise.clone(), schedule, steps=steps, eta=0.0, prediction_type=pred)
    diff = (ours - ref).abs().max().item()
    print(f"ddim steps={steps} {pred}: max abs diff {diff:.2e}")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)


def point_mass_model(x0_star: torch.Tensor, pred: str, schedule: NoiseSchedule):
    """Exact network for data = a single point: eps = (x_t - alpha x0*) / sigma (or its v equivalent)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = (x - alpha * x0_star) / sigma
        return eps if pred == "epsilon" else alpha * eps - sigma * x0_star

    return fn


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_point_mass_is_recovered(schedule, name, pred):
    x0_star = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = sample(name, point_mass_model(x0_star, pred, schedule), noise, schedule, steps=20, eta=1.0,
                 prediction_type=pred, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x0_star, atol=1e-3, rtol=0)


def test_dpmpp_2m_solves_gaussian_ode(schedule):
    """Data N(mu, s^2): the probability-flow ODE keeps z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2), so the
    exact state at the last grid time is known; both samplers then take the same final x0 projection, so the
    difference measures the solver's integration error alone (the sigma -> 0 jump is common to both)."""
    mu, s = 0.5, 0.5

    def coef(t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        abar = schedule.alphas_cumprod[t].double()
        return abar.sqrt(), (1 - abar).sqrt()

    def x0_of(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in coef(t))
        return ((x.double() - alpha * x0_of(x.double(), alpha, sigma)) / sigma).float()

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    steps = 20
    (a_T, s_T), (a_l, s_l) = coef(999), coef(ddim_timesteps(1000, steps)[-1])
    z = (noise.double() - a_T * mu) / (a_T**2 * s**2 + s_T**2).sqrt()
    exact = x0_of(a_l * mu + (a_l**2 * s**2 + s_l**2).sqrt() * z, a_l, s_l).float()
    err = (sample_dpmpp_2m(model, noise, schedule, steps=steps) - exact).abs().max().item()
    err_ddim = (sample_ddim(model, noise, schedule, steps=steps) - exact).abs().max().item()
    print(f"gaussian ODE, {steps} steps: dpmpp_2m err {err:.2e}, ddim err {err_ddim:.2e}")
    assert err < 1e-2 and err < err_ddim / 5  # measured: 4.3e-3 vs 6.3e-2


def test_ddpm_seeding(schedule):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))

    def run(seed: int) -> torch.Tensor:
        return sample("ddpm", linear_model, noise.clone(), schedule, steps=10,
                      generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0), run(0), atol=0, rtol=0)
    assert (run(0) - run(1)).abs().max() > 1e-2


def test_ddpm_equals_ddim_eta_one(schedule):
    """DDIM with eta=1 is the DDPM posterior written differently: same noise draws, same result."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    a = sample_ddpm(linear_model, noise.clone(), schedule, steps=10, generator=torch.Generator().manual_seed(8))
    b = sample_ddim(linear_model, noise.clone(), schedule, steps=10, eta=1.0,
                    generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dispatch_ignores_unused_kwargs(schedule):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    a = sample("dpmpp_2m", linear_model, noise, schedule, steps=5, eta=0.7, progress=False,
               generator=torch.Generator())
    torch.testing.assert_close(a, sample_dpmpp_2m(linear_model, noise, schedule, steps=5))


def test_unknown_or_mismatched_sampler(schedule):
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        sample("nope", linear_model, torch.zeros(SHAPE), schedule, steps=2)
    with pytest.raises(ValueError, match="does not fit prediction_type='epsilon'.*ddim.*ddpm.*dpmpp_2m"):
        sample("euler", linear_model, torch.zeros(SHAPE), schedule, steps=2)
    with pytest.raises(ValueError, match="does not fit prediction_type='flow'.*euler.*heun"):
        sample("ddim", linear_model, torch.zeros(SHAPE), schedule, steps=2, prediction_type="flow")


def test_guidance_interval_guides_only_inside_it():
    """Inside the interval both halves run in one batch and are mixed; outside only the conditional half runs."""
    from ldm.diffusion.samplers import check_guidance_interval, classifier_free_guidance

    batches = []

    def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return x * 0 + context.view(-1, 1, 1, 1)

    cond, uncond = torch.full((2,), 1.0), torch.full((2,), 0.0)
    fn = classifier_free_guidance(model, cond, uncond, 4.0, interval=(0.1, 0.9), time_scale=1000.0)
    x = torch.zeros(SHAPE)
    inside = fn(x, torch.full((2,), 500.0))
    outside = [fn(x, torch.full((2,), t)) for t in (950.0, 50.0)]
    assert batches == [4, 2, 2]
    assert torch.all(inside == 4.0) and all(torch.all(o == 1.0) for o in outside)
    everywhere = classifier_free_guidance(model, cond, uncond, 4.0)(x, torch.full((2,), 950.0))
    assert torch.all(everywhere == 4.0)
    assert check_guidance_interval(None) is None and check_guidance_interval([0, 1]) == (0.0, 1.0)
    for bad in ([0.5, 0.5], [0.2], [-0.1, 0.5], [0.2, 1.5]):
        with pytest.raises(ValueError, match="guidance_interval"):
            check_guidance_interval(bad)
