"""Flow matching: the path, its target, logit-normal timesteps, min-SNR weighting and the Euler/Heun samplers."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.objectives import to_x0_eps, training_target
from ldm.diffusion.samplers import sample
from ldm.diffusion.weighting import min_snr_weight

torch.set_num_threads(1)
SHAPE = (3, 2, 4, 4)


def draws(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_path_ends_and_velocity_target():
    flow, x0, noise = FlowSchedule(), draws(0), draws(1)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = flow.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    # The target is the time derivative of the path: a finite difference along t agrees.
    dt = 1e-3
    deriv = (flow.add_noise(x0, noise, t + dt) - flow.add_noise(x0, noise, t)) / dt
    alpha, sigma = flow.coefficients(t, x0.ndim)
    torch.testing.assert_close(training_target("flow", x0, noise, alpha, sigma), deriv, atol=1e-3, rtol=1e-3)


def test_velocity_gives_back_x0_and_noise():
    flow, x0, noise = FlowSchedule(), draws(2), draws(3)
    t = torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = flow.coefficients(t, x0.ndim)
    xt = flow.add_noise(x0, noise, t)
    x0_hat, eps_hat = to_x0_eps("flow", noise - x0, xt, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


def test_logit_normal_timesteps_and_shift():
    flow = FlowSchedule(logit_mean=0.5, logit_std=0.8)
    t = flow.sample_timesteps(50_000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    shifted = FlowSchedule(shift=3.0)
    assert shifted.shift_time(torch.tensor(0.5)).item() == pytest.approx(0.75)
    times = shifted.sampling_times(4)
    assert times[0] == 1 and times[-1] == 0 and bool((times[1:] < times[:-1]).all())
    assert shifted.model_time(torch.tensor([0.25])).item() == 250.0
    with pytest.raises(ValueError, match="logit_std"):
        FlowSchedule(logit_std=0.0)


def test_min_snr_weight_for_flow_weights_x0_error_by_clipped_snr():
    """The weighted velocity error equals min(SNR, gamma) x the x0 error, as for epsilon and v_prediction."""
    flow, x0, noise = FlowSchedule(), draws(4), draws(5)
    t = torch.tensor([0.05, 0.5, 0.95])
    alpha, sigma = flow.coefficients(t, x0.ndim)
    xt = flow.add_noise(x0, noise, t)
    v_hat = noise - x0 + 0.1 * draws(6)
    x0_hat, _ = to_x0_eps("flow", v_hat, xt, alpha, sigma)
    v_err = (v_hat - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
    x0_err = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    snr = (alpha / sigma).flatten() ** 2
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "flow") * v_err, snr.clamp(max=5.0) * x0_err)
    assert torch.equal(min_snr_weight(snr, None, "flow"), torch.ones(3))


@pytest.mark.parametrize("steps", [1, 7])
def test_euler_recovers_a_point_mass_exactly(steps):
    """For one data point the flow is a straight line, which Euler follows exactly at any step count. (Heun
    evaluates the velocity at t = 0, where a point mass's field is singular: it is tested on Gaussian data.)"""
    flow, target = FlowSchedule(shift=2.0), draws(7)

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        t = (model_t / flow.time_scale).view(-1, 1, 1, 1)
        return (x - target) / t

    out = sample("euler", velocity, draws(8), flow, steps=steps, prediction_type="flow")
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_heun_is_more_accurate_than_euler_on_gaussian_data():
    """Data N(mu, s^2): the ODE keeps z = (x - (1 - t) mu) / sqrt((1 - t)^2 s^2 + t^2), so it ends at mu + s z."""
    mu, s = 0.5, 0.3
    flow = FlowSchedule()

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        t = (model_t.double() / flow.time_scale).view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        return (-mu + (x.double() - (1 - t) * mu) * (t - (1 - t) * s**2) / var).float()

    noise = draws(9)
    exact = mu + s * noise
    err = {name: (sample(name, velocity, noise, flow, steps=10, prediction_type="flow") - exact).abs().max().item()
           for name in ("euler", "heun")}
    print(f"gaussian flow ODE, 10 steps: {err}")
    assert err["heun"] < 1e-2 and err["heun"] < err["euler"] / 5


def test_heun_makes_two_calls_per_step():
    calls = []

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        calls.append(model_t[0].item())
        return torch.zeros_like(x)

    sample("heun", velocity, draws(10), FlowSchedule(), steps=4, prediction_type="flow")
    assert calls == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0, 0.0]


def test_flow_module_trains_and_samples():
    from tests.ldm_factory import tiny_ldm

    with pytest.raises(ValueError, match="does not fit prediction_type='flow'"):
        tiny_ldm(prediction_type="flow")  # the default ddim sampler
    module = tiny_ldm(prediction_type="flow", sampler="heun", snr_gamma=None)
    module.log = lambda *a, **k: None
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = module.training_step({"image": images, "caption": ["a"] * 4}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    out = module.generate(["a", "b"], seed=3)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    # the stochastic sampler draws each sample's fresh noise from its own seed: same seed, same image
    pair = module.generate(["a", "b"], seeds=[3, 4], sampler="euler_ancestral")
    alone = module.generate(["b"], seeds=[4], sampler="euler_ancestral")
    torch.testing.assert_close(pair[1:], alone, atol=1e-4, rtol=0)  # batch size moves float sums only
    assert not torch.allclose(module.generate(["b"], seeds=[5], sampler="euler_ancestral"), alone)


def test_euler_ancestral_matches_diffusers_stochastic_flow_match_euler():
    """Our stochastic Euler is diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) on the same
    times and the same noise draws."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow, steps = FlowSchedule(), 6
    times = flow.sampling_times(steps)

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:  # smooth, x- and t-dependent
        return 0.3 * x - torch.cos(model_t / 400).view(-1, 1, 1, 1)

    noise = draws(11)
    ours = sample("euler_ancestral", velocity, noise.clone(), flow, steps=steps, prediction_type="flow",
                  generator=torch.Generator().manual_seed(5))
    ref = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    ref.set_timesteps(sigmas=times[:-1].tolist())
    assert torch.allclose(ref.sigmas.float(), times, atol=1e-6), (ref.sigmas, times)
    x, gen = noise.clone(), torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        x = ref.step(velocity(x, t.expand(x.shape[0]).float()), t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    euler = sample("euler", velocity, noise.clone(), flow, steps=steps, prediction_type="flow")
    assert (ours - euler).abs().max() > 0.1  # it is stochastic: not the ODE's answer


def test_euler_ancestral_recovers_a_point_mass_whatever_the_noise():
    flow, target = FlowSchedule(shift=2.0), draws(7)

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        t = (model_t / flow.time_scale).view(-1, 1, 1, 1)
        return (x - target) / t

    for seed in (0, 1):
        out = sample("euler_ancestral", velocity, draws(8), flow, steps=5, prediction_type="flow",
                     generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """With one generator per sample, a sample's fresh noise is its own: alone or second in a batch, same result."""
    flow = FlowSchedule()

    def velocity(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + (model_t / 1000).view(-1, 1, 1, 1)

    def gens(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    x = draws(12)[:2]
    pair = sample("euler_ancestral", velocity, x.clone(), flow, steps=4, prediction_type="flow", generator=gens(1, 2))
    alone = sample("euler_ancestral", velocity, x[1:].clone(), flow, steps=4, prediction_type="flow",
                   generator=gens(2))
    torch.testing.assert_close(pair[1:], alone, atol=0, rtol=0)
    other = sample("euler_ancestral", velocity, x[1:].clone(), flow, steps=4, prediction_type="flow",
                   generator=gens(3))
    assert not torch.equal(other, alone)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample("euler_ancestral", velocity, x, flow, steps=2, prediction_type="flow", generator=gens(1, 2, 3))


def test_model_guidance_trains_toward_the_networks_own_guided_output():
    from ldm.autoencoder.distribution import DiagonalGaussian
    from tests.ldm_factory import tiny_ldm

    with pytest.raises(ValueError, match="model_guidance must be in"):
        tiny_ldm(prediction_type="flow", sampler="euler", model_guidance=1.0)
    kw = dict(prediction_type="flow", sampler="euler", snr_gamma=None, cond_drop_prob=0.0)
    torch.manual_seed(0)
    module = tiny_ldm(model_guidance=0.5, **kw)
    for p in module.unet.parameters():  # zero-initialised outputs would hide the prompt's effect
        torch.nn.init.normal_(p, std=0.05)
    moments, captions = torch.randn(3, 8, 4, 4), ["a red circle", "a blue square", "b"]
    loss, _ = module.diffusion_loss(DiagonalGaussian(moments), captions, 7)
    # the same draws by hand: dropout mask, posterior sample, timesteps, noise (the module's order)
    cpu_gen, gen = module.step_generators(7)
    torch.rand(3, generator=cpu_gen)
    z0 = DiagonalGaussian(moments).sample(gen) * module.scale_factor
    t = module.schedule.sample_timesteps(3, z0.device, generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    x_t, mt = module.schedule.add_noise(z0, noise, t), module.schedule.model_time(t)
    out = module.unet(x_t, mt, module.encode_text(captions))
    out_u = module.unet(x_t, mt, module.encode_text([""] * 3))
    guided_target = (noise - z0) + 0.5 * (out - out_u).detach()
    expected = (out - guided_target).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    assert (out - out_u).abs().max() > 1e-5  # the prompt has an effect to amplify
    assert not torch.equal(loss, (out - (noise - z0)).pow(2).mean())  # and the guidance moved the target
    # the target is a constant: the gradient is the plain regression's toward it, nothing through out_u
    grads = torch.autograd.grad(loss, list(module.unet.parameters()))
    want = torch.autograd.grad(expected, list(module.unet.parameters()))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)
    # a dropped caption (the unconditional sample) keeps the plain target
    dropped = tiny_ldm(model_guidance=0.5, **{**kw, "cond_drop_prob": 1.0})
    plain = tiny_ldm(**{**kw, "cond_drop_prob": 1.0})
    dropped.load_state_dict(module.state_dict())
    plain.load_state_dict(module.state_dict())
    torch.testing.assert_close(dropped.diffusion_loss(DiagonalGaussian(moments), captions, 7)[0],
                               plain.diffusion_loss(DiagonalGaussian(moments), captions, 7)[0])
