"""Start-up checks: bad values fail before any data is read or a device is held, naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.data.buckets import check_bucket_factor, parse_buckets
from ldm.diffusion.objectives import PREDICTION_TYPES
from ldm.diffusion.samplers import check_sampler
from ldm.errors import ConfigError  # noqa: F401  (defined below every layer; imported from here by older code)


def check_autoencoder_resolution(resolution: int, ch_mult: list[int]) -> None:
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not divisible by the autoencoder's downsampling "
                          f"factor {factor} (model.autoencoder.ch_mult={list(ch_mult)})")


def check_buckets(cfg: Any, factor: int, what: str) -> None:
    """data.buckets must parse, and every bucket side be a multiple of `factor` (named by `what`)."""
    try:
        check_bucket_factor(parse_buckets(cfg.data.get("buckets"), int(cfg.data.resolution)), factor, what)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_ldm(cfg: Any, autoencoder_config: dict[str, Any]) -> None:
    module = cfg.stage.module
    if module.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"stage.module.prediction_type={module.prediction_type!r}: choose one of {PREDICTION_TYPES}")
    try:
        check_sampler(module.sampler, module.prediction_type)
    except ValueError as err:
        raise ConfigError(f"stage.module.sampler: {err}") from None
    kind = cfg.model.text_encoder.get("kind", "openclip")
    if kind == "none" and module.guidance_scale != 1.0:
        raise ConfigError(f"model.text_encoder=none is unconditional: set stage.module.guidance_scale=1.0 "
                          f"(got {module.guidance_scale}); there is nothing to guide towards")
    if module.schedule.get("rescale_zero_terminal_snr") and module.prediction_type == "epsilon":
        raise ConfigError("stage.module.schedule.rescale_zero_terminal_snr=true needs "
                          "stage.module.prediction_type=v_prediction: at SNR 0 the noise says nothing about x0")
    if module.get("offset_noise", 0.0) < 0:
        raise ConfigError(f"stage.module.offset_noise={module.offset_noise} must be >= 0")
    if not 0.0 <= module.cond_drop_prob < 1.0:
        raise ConfigError(f"stage.module.cond_drop_prob={module.cond_drop_prob} must be in [0, 1)")
    check_autoencoder_resolution(cfg.data.resolution, autoencoder_config["ch_mult"])
    # Only attention placement depends on the resolution; convolutional autoencoders (SD's) run at any size.
    if autoencoder_config.get("attn_resolutions") and autoencoder_config["resolution"] != cfg.data.resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution} differs from the autoencoder's training "
                          f"resolution {autoencoder_config['resolution']} and it has attn_resolutions; "
                          f"set data.resolution to match")
    latent = cfg.data.resolution // 2 ** (len(autoencoder_config["ch_mult"]) - 1)
    unet_factor = 2 ** (len(cfg.model.unet.channel_mult) - 1)
    if latent % unet_factor:
        raise ConfigError(f"latent size {latent} is not divisible by the UNet's downsampling factor {unet_factor} "
                          f"(model.unet.channel_mult={list(cfg.model.unet.channel_mult)})")
    ae_factor = 2 ** (len(autoencoder_config["ch_mult"]) - 1)
    check_buckets(cfg, ae_factor * unet_factor, f"autoencoder factor {ae_factor} x UNet downsampling {unet_factor}")


def resolve_autoencoder_path(cfg: Any) -> Path:
    """The autoencoder stage=ldm starts from: model.autoencoder.init_from, else paths.autoencoder.

    Any layout `AutoencoderKL.from_pretrained` reads: our export, a diffusers folder (or a pipeline folder
    with vae/), a CompVis .ckpt/.safetensors (whole SD checkpoint or VAE-only).
    """
    explicit = cfg.model.autoencoder.get("init_from")
    path = Path(explicit or cfg.paths.autoencoder)
    found = path.is_file() or (path.is_dir() and any(
        (path / name).exists() for name in ("autoencoder.safetensors", "config.json", "vae/config.json")))
    if not found:
        where = "model.autoencoder.init_from" if explicit else "the default export path paths.autoencoder"
        raise ConfigError(
            f"stage=ldm needs a trained autoencoder, and none was found at {path} ({where}).\n"
            f"  Train one first:      python train.py stage=vae   (it exports to {cfg.paths.autoencoder})\n"
            f"  or point to one:      python train.py stage=ldm model.autoencoder.init_from=PATH\n"
            f"                        (our export, a diffusers folder, or a Stable Diffusion .ckpt/.safetensors)")
    return path
