"""Config composition and start-up checks."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.train.checks import ConfigError, check_autoencoder_resolution, check_ldm, resolve_autoencoder_path

from .conftest import ROOT


def compose_train(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="train", overrides=list(overrides))


def test_default_is_stage_vae_on_shapes():
    cfg = compose_train()
    assert cfg.stage.name == "vae"
    assert cfg.data.name == "shapes"
    assert cfg.stage.module._target_ == "ldm.autoencoder.module.AutoencoderModule"
    assert cfg.stage.module.autoencoder.resolution == cfg.data.resolution
    assert cfg.trainer.max_steps > 0
    OmegaConf.to_container(cfg.stage.module, resolve=True)  # everything resolves


def test_stage_ldm_composes_with_presets():
    cfg = compose_train("stage=ldm", "model/unet=sd15", "model/text_encoder=openclip_vit_h14", "~recipe")
    assert cfg.stage.name == "ldm"
    assert cfg.stage.module.unet.model_channels == 320
    assert cfg.stage.module.text_encoder.model_name == "ViT-H-14"
    assert cfg.stage.module.prediction_type == "epsilon"
    assert cfg.trainer.max_steps != compose_train().trainer.max_steps  # the stage sets its own length


def test_overrides_reach_the_module():
    cfg = compose_train("stage=ldm", "stage.module.guidance_scale=5.0", "data.resolution=64")
    assert cfg.stage.module.guidance_scale == 5.0
    assert cfg.stage.module.autoencoder.resolution == 64


def test_resolution_not_divisible_by_factor():
    with pytest.raises(ConfigError, match="data.resolution=30"):
        check_autoencoder_resolution(30, [1, 2, 2])


def test_ldm_checks_name_the_key():
    cfg = compose_train("stage=ldm", "stage.module.sampler=plms")
    ae = {"ch_mult": [1, 2, 2], "resolution": 32}
    with pytest.raises(ConfigError, match="stage.module.sampler"):
        check_ldm(cfg, ae)
    cfg = compose_train("stage=ldm", "stage.module.prediction_type=x0")
    with pytest.raises(ConfigError, match="prediction_type"):
        check_ldm(cfg, ae)
    cfg = compose_train("stage=ldm")
    with pytest.raises(ConfigError, match="differs from the autoencoder"):
        check_ldm(cfg, {"ch_mult": [1, 2, 2], "resolution": 64, "attn_resolutions": [16]})
    check_ldm(cfg, {"ch_mult": [1, 2, 2], "resolution": 64, "attn_resolutions": []})  # convolutional: any size


def test_missing_autoencoder_message(tmp_path):
    cfg = compose_train("stage=ldm", f"paths.exports={tmp_path}/exports")
    with pytest.raises(ConfigError) as err:
        resolve_autoencoder_path(cfg)
    assert "python train.py stage=vae" in str(err.value)
    assert "model.autoencoder.init_from" in str(err.value)


@pytest.mark.parametrize("layout", ["diffusers", "compvis-sd", "compvis-vae"])
def test_stage_ldm_starts_from_sd_and_diffusers_autoencoders(tmp_path, layout):
    import torch

    from ldm.autoencoder.model import AutoencoderKL
    from ldm.train.cli import build_module

    source = AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    if layout == "diffusers":
        path = source.save_pretrained(tmp_path / "vae", format="diffusers", scaling_factor=0.5)
    elif layout == "compvis-sd":
        path = source.save_pretrained(tmp_path / "sd.ckpt", format="compvis", prefix="first_stage_model.")
    else:
        path = source.save_pretrained(tmp_path / "vae.safetensors", format="compvis")
    cfg = compose_train("stage=ldm", f"model.autoencoder.init_from={path}")
    module = build_module(cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(module.autoencoder.state_dict()[key], value), key
    if layout == "diffusers":  # the diffusers config's scaling_factor becomes the latent scale
        assert float(module.scale_factor) == 0.5
    cfg = compose_train("stage=ldm", f"model.autoencoder.init_from={tmp_path}/missing.ckpt")
    with pytest.raises(ConfigError, match="missing.ckpt"):
        build_module(cfg)


def test_shapes_recipe_applies_to_shapes_data_only():
    """conf/recipe/shapes_ldm.yaml is the built-in run's recipe; other data keep the paper's defaults."""
    shapes = compose_train("stage=ldm")
    assert shapes.stage.module.prediction_type == "flow" and shapes.stage.module.sampler == "euler_ancestral"
    assert shapes.model.text_encoder.freeze is False and shapes.model.unet.pooled_context is True
    assert list(shapes.model.unet.attention_resolutions) == [4] and list(shapes.model.unet.channel_mult) == [1, 2, 2]
    assert shapes.data.batch_size == 64 and shapes.trainer.max_steps == shapes.trainer.val_check_interval == 2800
    assert shapes.stage.module.lr_decay_fraction == 0.5 and list(shapes.stage.module.guidance_interval) == [0.3, 1.0]
    assert compose_train("stage.module.equivariance_weight=1.0").stage.module.equivariance_weight == 1.0
    assert compose_train("data=webdataset").stage.module.equivariance_weight == 0.0  # the paper's loss
    assert compose_train("data=webdataset", "stage=ldm").stage.module.lr_decay_fraction == 0.0
    for cfg in (compose_train("stage=ldm", "data=webdataset"), compose_train("stage=ldm", "~recipe")):
        assert cfg.stage.module.prediction_type == "epsilon" and cfg.stage.module.sampler == "ddim"
        assert cfg.model.text_encoder.freeze is True and cfg.model.unet.pooled_context is False
        assert list(cfg.model.unet.channel_mult) == [1, 2, 4]
    assert compose_train("stage=ldm", "stage.module.lr=7e-4").stage.module.lr == 7e-4  # the command line wins
    assert compose_train("stage=ldm", "experiment=v_prediction").stage.module.sampler == "ddim"  # presets too
    assert "prediction_type" not in compose_train().stage.module  # stage=vae: nothing of stage 2's recipe


def test_make_train_stage2_reads_latents_with_the_shapes_recipe():
    """make train's stage=ldm line trains from the encoded shards and still gets the built-in recipe."""
    import shlex

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "train.py stage=ldm" in ln and "latents" in ln)
    overrides = [w.replace("$(LATENTS)", "data/shapes-latents") for w in shlex.split(line)[2:]]
    cfg = compose_train(*overrides)
    assert cfg.data.name == "shapes" and cfg.data.latents is True
    assert cfg.data.train_shards == "data/shapes-latents/train" and cfg.data.val_shards == "data/shapes-latents/val"
    assert cfg.stage.module.prediction_type == "flow" and cfg.data.batch_size == 64  # the recipe still applies
    encode = [ln for ln in text.splitlines() if "ldm.data.latents" in ln]
    assert len(encode) == 2 and all("--resolution 32" in ln for ln in encode)
    assert cfg.data.resolution == 32
