"""Noise schedule, objectives, DDIM sampler, guidance and EMA."""

import pytest
import torch

from ldm.diffusion.ema import EMA
from ldm.diffusion.objectives import to_x0_eps, training_target
from ldm.diffusion.samplers import classifier_free_guidance, ddim_timesteps, sample_ddim
from ldm.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_schedules_are_monotone(kind):
    s = NoiseSchedule(kind)
    abar = s.alphas_cumprod
    assert abar.shape == (1000,)
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < abar[0] < 1


def test_unknown_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule("quadratic")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_objective_inverts(pred):
    s = NoiseSchedule()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a, sg = s.coefficients(t, 4)
    xt = a * x0 + sg * noise
    target = training_target(pred, x0, noise, a, sg)
    x0_hat, eps_hat = to_x0_eps(pred, target, xt, a, sg)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def test_ddim_timesteps():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_ddim_with_oracle_recovers_data():
    """With the exact eps of a single known x0, DDIM lands on x0."""
    s = NoiseSchedule()
    x0 = torch.randn(2, 4, 8, 8)

    def oracle(x, t):
        a, sg = s.coefficients(t, 4)
        return (x - a * x0) / sg

    out = sample_ddim(oracle, torch.randn(2, 4, 8, 8), s, steps=20)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_ddim_eta_uses_generator_deterministically():
    s = NoiseSchedule()

    def model(x, t):
        return 0.1 * x

    x = torch.randn(1, 4, 4, 4)
    a = sample_ddim(model, x, s, steps=5, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_ddim(model, x, s, steps=5, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = sample_ddim(model, x, s, steps=5, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_classifier_free_guidance_combines():
    def model(x, t, c):
        return x * 0 + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    cond, uncond = torch.full((1, 3, 2), 2.0), torch.zeros(1, 3, 2)
    fn = classifier_free_guidance(model, cond, uncond, 3.0)
    out = fn(torch.zeros(1, 1, 2, 2), torch.tensor([5]))
    assert torch.allclose(out, torch.full_like(out, 6.0))  # 0 + 3 * (2 - 0)
    assert torch.allclose(classifier_free_guidance(model, cond, uncond, 1.0)(torch.zeros(1, 1, 2, 2),
                                                                               torch.tensor([5])), out / 3)


def test_ema_warmup_and_update():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    d = 0.1
    torch.testing.assert_close(ema.model.weight, d * before + (1 - d) * net.weight)
    assert int(ema.num_updates) == 1
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == pytest.approx(0.9)
    assert not ema.model.weight.requires_grad


def test_min_snr_weight():
    from ldm.diffusion.weighting import min_snr_weight

    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(min_snr_weight(snr, None, "epsilon"), torch.ones(3))


def test_zero_terminal_snr_rescale():
    plain = NoiseSchedule()
    zero = NoiseSchedule(rescale_zero_terminal_snr=True)
    abar = zero.alphas_cumprod
    assert abar[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-5)  # first step unchanged
    assert abar[-1].item() == pytest.approx(2.0**-24)  # pure noise at the end, kept finite for log-SNR samplers
    assert plain.alphas_cumprod[-1].item() > 1e-3  # the flaw being fixed: SD's schedule leaks signal at t=T
    assert torch.all(abar[1:] < abar[:-1])
    root = abar.double().sqrt()[:-1]
    plain_root = plain.alphas_cumprod.double().sqrt()[:-1]
    ratio = (root - root[-1]) / (plain_root - plain_root[-1])  # an affine map of sqrt(abar)
    assert torch.allclose(ratio[:-1], ratio[0].expand_as(ratio[:-1]), rtol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_zero_terminal_snr_with_v_prediction_recovers_data(sampler):
    from ldm.diffusion.samplers import sample

    s = NoiseSchedule(rescale_zero_terminal_snr=True)
    x0 = torch.randn(2, 4, 8, 8)

    def oracle_v(x, t):
        a, sg = s.coefficients(t, 4)
        eps = (x - a * x0) / sg
        return a * eps - sg * x0

    out = sample(sampler, oracle_v, torch.randn(2, 4, 8, 8), s, steps=20, prediction_type="v_prediction")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_zero_terminal_snr_needs_v_prediction():
    from hydra import compose, initialize_config_dir

    from ldm.train.checks import ConfigError, check_ldm

    from .conftest import ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=["stage=ldm", "~recipe",
                                                      "stage.module.schedule.rescale_zero_terminal_snr=true"])
        ok = compose(config_name="train", overrides=["stage=ldm", "~recipe",
                                                     "stage.module.schedule.rescale_zero_terminal_snr=true",
                                                     "stage.module.prediction_type=v_prediction"])
    ae = {"ch_mult": [1, 2], "resolution": 32, "attn_resolutions": []}
    with pytest.raises(ConfigError, match="v_prediction"):
        check_ldm(cfg, ae)
    check_ldm(ok, ae)


def test_ema_decay_reads_the_device_counter_once(monkeypatch):
    """The warm-up decay comes from a host copy of num_updates (a CUDA read would stall every step), which a
    loaded state dict replaces."""
    ema = EMA(torch.nn.Linear(2, 2), decay=0.99)
    reads = []
    real_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or real_int(t))
    for _ in range(5):
        ema.update(ema.model)
    assert len(reads) == 1 and int(ema.num_updates) == 5
    assert ema.current_decay() == pytest.approx(6 / 15)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    state["num_updates"].fill_(40)
    ema.load_state_dict(state)
    assert ema.current_decay() == pytest.approx(41 / 50)
