"""Autoencoder, LPIPS, UNet and text encoder: shapes, export round trips, determinism."""

import pytest
import torch

from ldm.autoencoder.loss import VAELoss
from ldm.autoencoder.lpips import LPIPS
from ldm.autoencoder.model import AutoencoderKL
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder
from ldm.diffusion.unet import UNetModel, unet_preset

from .conftest import block_runs

TINY_AE = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=16, attn_resolutions=[8])


def test_autoencoder_shapes_and_kl():
    ae = AutoencoderKL(**TINY_AE)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    assert posterior.mean.shape == (2, 4, 4, 4)
    assert ae.downsample_factor == 4
    recon, post = ae(x)
    assert recon.shape == x.shape
    kl = post.kl()
    assert kl.shape == (2,) and torch.all(kl >= 0)


def test_autoencoder_export_round_trip(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY_AE)
    ae.save_pretrained(tmp_path / "ae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae")
    assert loaded.config == ae.config
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded.encode(x).mean, ae.encode(x).mean)
    with pytest.raises(FileNotFoundError, match="no autoencoder weights"):
        AutoencoderKL.from_pretrained(tmp_path / "missing")


def test_vae_loss_terms_and_gradients():
    ae = AutoencoderKL(**TINY_AE)
    loss_fn = VAELoss(perceptual_weight=1.0, kl_weight=1e-6)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = ae(x)
    loss, logs = loss_fn.generator(x, recon, post, global_step=0, last_layer=ae.last_layer_weight())
    assert set(logs) >= {"l1", "lpips", "kl", "nll", "logvar", "loss"}
    assert logs["lpips"] > 0
    loss.backward()
    assert ae.decoder.conv_out.weight.grad is not None
    assert loss_fn.logvar.grad is not None
    assert all(p.grad is None for p in loss_fn.lpips.parameters())  # LPIPS stays frozen


def test_lpips_is_zero_on_identical_images_and_positive_otherwise():
    lp = LPIPS(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    assert torch.all(lp(x, -x) > 0)


@pytest.mark.parametrize("heads", [dict(num_heads=2), dict(num_head_channels=16)])
@pytest.mark.parametrize("linear", [False, True])
def test_unet_output_shape(heads, linear):
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[1, 2], context_dim=24, use_linear_in_transformer=linear, **heads)
    x = torch.randn(2, 4, 8, 8)
    out = unet(x, torch.tensor([1, 500]), torch.randn(2, 5, 24))
    assert out.shape == x.shape


def test_unet_context_changes_output_and_checkpointing_matches():
    torch.manual_seed(0)
    unet = unet_preset("tiny", in_channels=4, out_channels=4)
    for p in unet.parameters():  # zero-initialized output layers would hide the context's effect
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    c1, c2 = torch.randn(1, 7, 64), torch.randn(1, 7, 64)
    assert not torch.allclose(unet(x, t, c1), unet(x, t, c2))
    ckpt = unet_preset("tiny", in_channels=4, out_channels=4, use_checkpoint=True)
    ckpt.load_state_dict(unet.state_dict())
    ckpt.train()
    unet.train()
    torch.testing.assert_close(ckpt(x, t, c1), unet(x, t, c1))
    grads, runs = [], []
    for model in (unet, ckpt):  # the backward too: recomputed blocks, same gradients
        model.zero_grad()
        runs.append(block_runs(model, lambda m=model: m(x, t, c1).square().mean().backward()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(runs[0]) == {1} and set(runs[1]) == {2}, runs
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_pooled_context_reaches_the_resblocks_and_starts_as_a_no_op():
    torch.manual_seed(0)
    unet = unet_preset("tiny", in_channels=4, out_channels=4, pooled_context=True)
    for name, p in unet.named_parameters():  # keep the attention outputs zero: only the pooled path may carry c
        if "proj_out" not in name and "context_embed.2" not in name:
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    c1, c2 = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    # zero-initialised last layer: the prompt has no effect yet, as in a UNet without the pooled path
    torch.testing.assert_close(unet(x, t, c1), unet(x, t, c2))
    torch.nn.init.normal_(unet.context_embed[2].weight, std=0.05)
    assert not torch.allclose(unet(x, t, c1), unet(x, t, c2))
    plain = unet_preset("tiny", in_channels=4, out_channels=4)
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("context_embed")})
    torch.testing.assert_close(plain(x, t, c1), plain(x, t, c2))  # without it, zero attention outputs hide c
    assert unet.config["pooled_context"] is True
    with pytest.raises(ValueError, match="pooled_context needs the context"):
        unet(x, t, None)
    with pytest.raises(ValueError, match="pooled_context needs a context"):
        UNetModel(model_channels=32, channel_mult=[1], num_head_channels=32, pooled_context=True)


def test_pooled_context_round_trips_and_maps_to_diffusers_projection_class_embedding(tmp_path):
    from ldm.checkpoints.unet import config_from_diffusers, diffusers_config, guess_arch

    unet = unet_preset("tiny", in_channels=4, out_channels=4, pooled_context=True)
    torch.nn.init.normal_(unet.context_embed[2].weight, std=0.05)
    back = UNetModel.from_pretrained(unet.save_pretrained(tmp_path / "ours"))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 7, 64)
    torch.testing.assert_close(back(x, t, c), unet(x, t, c))
    assert guess_arch(unet.state_dict())["pooled_context"] is True  # a CompVis-key file says so by its keys
    dcfg = diffusers_config(unet.config)  # outputs checked against diffusers in tests/test_unet_compat.py
    assert dcfg["class_embed_type"] == "projection" and dcfg["projection_class_embeddings_input_dim"] == 64
    assert config_from_diffusers(dcfg)["pooled_context"] is True
    with pytest.raises(ValueError, match="must equal cross_attention_dim"):
        config_from_diffusers({**dcfg, "projection_class_embeddings_input_dim": 32})
    with pytest.raises(ValueError, match="one class_embedding"):
        diffusers_config({**unet.config, "num_classes": 3})


def test_unet_rejects_ambiguous_heads():
    with pytest.raises(ValueError, match="num_heads"):
        UNetModel(model_channels=32, channel_mult=[1], num_heads=2, num_head_channels=16)


def test_text_encoder_deterministic_frozen_and_prompt_sensitive():
    a = OpenCLIPTextEncoder(width=32, heads=2, layers=1)
    b = OpenCLIPTextEncoder(width=32, heads=2, layers=1)
    prompts = ["a red circle on a blue background", "a blue circle on a red background"]
    ea, eb = a(prompts), b(prompts)
    assert ea.shape == (2, 77, 32)
    torch.testing.assert_close(ea, eb)  # same random tower in every process
    assert not torch.allclose(ea[0], ea[1])
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training
    pen = OpenCLIPTextEncoder(width=32, heads=2, layers=2, layer="penultimate")
    assert pen(prompts).shape == (2, 77, 32)
    with pytest.raises(ValueError, match="layer"):
        OpenCLIPTextEncoder(layer="middle")


def test_a_pooled_context_model_is_no_stable_diffusion_pipeline():
    from ldm.checkpoints.pipeline import pipeline_text_encoder
    from tests.ldm_factory import tiny_ldm

    assert pipeline_text_encoder(tiny_ldm()) is not None  # the same model without it exports
    with pytest.raises(ValueError, match="pass class_labels=prompt_embeds.mean"):
        pipeline_text_encoder(tiny_ldm(unet={"pooled_context": True}))
