"""The scale presets (conf/experiment/kl_f8_paper, txt2img_256_from_scratch, txt2img_512_from_256): each composes to
its published values, and each runs two steps on the CPU with the architecture shrunk and the weights random,
chained as a user runs them: kl_f8_paper exports the autoencoder the 256 run reads, and the 512 run starts from
the 256 run's export with model.init_from."""

from __future__ import annotations

import json
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import ROOT, run_script

# Sizes only (the tests' data, no logger, no downloads): widths shrink, the level and block structure stays.
RUN = ["logger=csv", "trainer.accelerator=cpu", "trainer.precision=32", "trainer.max_steps=2",
       "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=100", "data.batch_size=2",
       "data.val_batch_size=2", "data.num_workers=0", "paths.runs=runs"]
OFFLINE_VAE = ["stage.module.loss.lpips_pretrained=false", "stage.module.metrics.fid.extractor=small",
               "stage.module.metrics.fid.num_features=64"]
SMALL_VAE = ["model.autoencoder.ch=16", "stage.module.loss.disc_ndf=8",
             "stage.module.loss.disc_start=1"]  # the GAN's step too, within two steps
# The 256 run: a random OpenCLIP tower of the same kind (penultimate needs 2 layers), SD 2's UNet levels at width 32
SMALL_LDM = ["model.text_encoder.model_name=null", "model.text_encoder.pretrained=null", "+model.text_encoder.width=32",
             "+model.text_encoder.heads=2", "+model.text_encoder.layers=2", "model.text_encoder.context_length=16",
             "model.unet.model_channels=32", "model.unet.num_head_channels=16"]
NO_METRICS = ["stage.module.metrics.num_samples=0", "trainer.limit_val_batches=0"]


def composed(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def test_kl_f8_paper_holds_the_compvis_values():
    cfg = composed("kl_f8_paper")
    ae, module, loss = cfg.model.autoencoder, cfg.stage.module, cfg.stage.module.loss
    assert cfg.stage.name == "vae" and cfg.data.name == "webdataset" and cfg.data.resolution == 256
    assert (ae.ch, list(ae.ch_mult), ae.num_res_blocks, ae.z_channels, ae.embed_dim) == (128, [1, 2, 4, 4], 2, 4, 4)
    assert list(ae.attn_resolutions) == [] and ae.double_z
    assert (loss.disc_start, loss.kl_weight, loss.disc_weight, loss.perceptual_weight) == (50001, 1e-6, 0.5, 1.0)
    assert loss.lpips_pretrained and (loss.disc_num_layers, loss.disc_ndf, loss.disc_loss) == (3, 64, "hinge")
    assert list(module.betas) == [0.5, 0.9] and module.warmup_steps == 0 and module.disc_lr is None
    # 4.5e-6 scaled by CompVis' accumulate_grad_batches 2 x batch 12 x one GPU, as one batch of 24
    assert module.lr == pytest.approx(4.5e-6 * 2 * 12) and cfg.data.batch_size == 24


@pytest.mark.parametrize("name, resolution, steps", [("txt2img_256_from_scratch", 256, 550_000),
                                                     ("txt2img_512_from_256", 512, 850_000)])
def test_txt2img_presets_hold_the_sd2_base_values(name, resolution, steps):
    extra = ["model.init_from=/the/256/export"] if "512" in name else []
    cfg = composed(name, *extra)
    unet, text, module = cfg.model.unet, cfg.model.text_encoder, cfg.stage.module
    assert cfg.stage.name == "ldm" and cfg.data.resolution == resolution and cfg.trainer.max_steps == steps
    assert (unet.model_channels, list(unet.channel_mult), unet.num_res_blocks) == (320, [1, 2, 4, 4], 2)
    assert list(unet.attention_resolutions) == [4, 2, 1] and unet.num_head_channels == 64
    assert unet.transformer_depth == 1 and unet.use_linear_in_transformer and unet.context_dim is None  # 1024: ViT-H's
    assert (text.model_name, text.pretrained, text.layer, text.freeze) == ("ViT-H-14", "laion2b_s32b_b79k",
                                                                           "penultimate", True)
    schedule = OmegaConf.to_container(module.schedule)
    assert schedule == {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "rescale_zero_terminal_snr": False}
    assert module.prediction_type == "epsilon" and module.scale_factor == 0.18215 and module.snr_gamma is None
    assert (module.lr, module.warmup_steps, module.lr_decay_fraction) == (1e-4, 10000, 0.0)
    assert cfg.model.autoencoder.ch == 128 and list(cfg.model.autoencoder.ch_mult) == [1, 2, 4, 4]


def test_512_preset_without_the_256_export_stops_naming_the_key():
    from ldm.train.checks import ConfigError
    from ldm.train.init_from import plan_init

    with pytest.raises(ConfigError, match=r"model\.init_from=<the export of a txt2img_256_from_scratch run"):
        plan_init(composed("txt2img_512_from_256"), [])


def test_presets_run_two_steps_chained(tiny_shapes, tmp_path, one_thread):
    start = time.time()
    shards = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    vae = run_script("train.py", "stage=vae", "experiment=kl_f8_paper", *RUN, *shards, "data.resolution=32",
                     *SMALL_VAE, *OFFLINE_VAE, "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                     cwd=tmp_path)
    summary = json.loads(next((tmp_path / "runs" / "vae").glob("*/summary.json")).read_text())
    assert summary["optimizer_steps_per_rank"] == [[2, 1]], summary  # the GAN from its disc_start on
    ae = json.loads((tmp_path / "exports" / "autoencoder" / "autoencoder.json").read_text())
    assert (ae["ch"], ae["ch_mult"], ae["z_channels"]) == (16, [1, 2, 4, 4], 4), vae.stdout[-2000:]
    print(f"kl_f8_paper: {time.time() - start:.0f} s")

    start = time.time()
    run_script("train.py", "stage=ldm", "experiment=txt2img_256_from_scratch", *RUN, *shards, "data.resolution=64",
               *SMALL_LDM, *NO_METRICS, cwd=tmp_path)
    first = next((tmp_path / "runs" / "ldm").glob("*/export"))
    meta = json.loads((first / "unet.json").read_text())
    assert meta["unet"]["channel_mult"] == [1, 2, 4, 4] and meta["unet"]["context_dim"] == 32
    assert meta["prediction_type"] == "epsilon" and meta["scale_factor"] == pytest.approx(0.18215)
    assert meta["module"]["text_encoder"]["layer"] == "penultimate"
    print(f"txt2img_256_from_scratch: {time.time() - start:.0f} s")

    start = time.time()
    # the architecture comes from the 256 export: no width overrides, only the data's size and no downloads
    second = run_script("train.py", "stage=ldm", "experiment=txt2img_512_from_256", f"model.init_from={first}",
                        *RUN, *shards, "data.resolution=128", "data.min_size=0", *NO_METRICS,
                        "paths.runs=runs512", cwd=tmp_path)
    assert "init_from: UNet and text encoder weights loaded" in second.stdout
    meta = json.loads(next((tmp_path / "runs512" / "ldm").glob("*/export/unet.json")).read_text())
    assert meta["unet"]["model_channels"] == 32 and meta["module"]["text_encoder"]["width"] == 32
    assert meta["prediction_type"] == "epsilon" and meta["scale_factor"] == pytest.approx(0.18215)
    print(f"txt2img_512_from_256: {time.time() - start:.0f} s")
