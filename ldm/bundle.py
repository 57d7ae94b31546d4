"""The stage=ldm deliverable as a whole model: a LatentDiffusionModule in and out of its export folder.

This sits above training: it builds the LatentDiffusionModule and hands each part to the format layer
(`ldm.checkpoints`), which owns the folder's layout (`bundle_layout`) and every outside layout (diffusers,
Stable Diffusion single file, CompVis). A Lightning checkpoint and a bundle load into the same module, so
sampling does not care which one it was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.checkpoints import autoencoder as ae_ckpt
from ldm.checkpoints import pipeline
from ldm.checkpoints import unet as unet_ckpt
from ldm.checkpoints.bundle_layout import (
    AUTOENCODER_DIR,
    EMA_WEIGHTS,
    TEXT_WEIGHTS,
    plain,
    read_hparams,
    read_text_weights,
    read_unet_weights,
    sampling_conditioner,
    save_tensors,
    write_config,
)
from ldm.conditioning import rebuilt_from_name
from ldm.diffusion.module import LatentDiffusionModule


def write_bundle(module: Any, out: str | Path, outside_layouts: bool = True) -> Path:
    """Write a trained LatentDiffusionModule as its export folder (EMA UNet weights).

    The diffusers and CompVis copies are skipped with a printed reason when the architecture cannot be
    expressed there (e.g. diffusers needs level widths that are multiples of 32).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = module.ema.model
    save_tensors(unet.state_dict(), out / EMA_WEIGHTS)
    ae_ckpt.save_autoencoder(module.autoencoder, out / AUTOENCODER_DIR)
    hparams = plain(dict(module.hparams))
    conditioner = sampling_conditioner(module)
    # Frozen published OpenCLIP weights are rebuilt from their name; saving 1-2 GB again buys nothing.
    if conditioner is not None and not rebuilt_from_name(hparams.get("text_encoder") or {}):
        save_tensors(conditioner.state_dict(), out / TEXT_WEIGHTS)
    write_config(out, unet.config, float(module.scale_factor), hparams)
    if outside_layouts:
        write_outside_layouts(module, out)
    return out


def write_outside_layouts(module: Any, out: str | Path) -> list[Path]:
    """diffusers folders and CompVis safetensors of the EMA UNet and the autoencoder, and (when a
    StableDiffusionPipeline can express the model) the whole pipeline and an SD single file."""
    out = Path(out)
    unet, ae = module.ema.model, module.autoencoder
    scale = float(module.scale_factor) if float(module.scale_factor) > 0 else None
    size = ae.config["resolution"] // ae.downsample_factor
    jobs = [("diffusers UNet", lambda: unet_ckpt.save_diffusers(unet, out / "diffusers" / "unet", sample_size=size)),
            ("diffusers autoencoder", lambda: ae_ckpt.save_diffusers(ae, out / "diffusers" / "vae", scale)),
            ("CompVis UNet", lambda: unet_ckpt.save_compvis(unet, out / "compvis" / "unet.safetensors")),
            ("CompVis autoencoder", lambda: ae_ckpt.save_compvis(ae, out / "compvis" / "vae.safetensors")),
            ("diffusers pipeline", lambda: pipeline.save_pipeline(module, out / "diffusers")),
            ("SD single file", lambda: pipeline.save_single_file(module, out / "sd.safetensors"))]
    written = []
    for what, save in jobs:
        try:
            written.append(Path(save()))
        except ValueError as err:  # an architecture that layout cannot express: say so, keep the rest
            print(f"[ldm] no {what} export: {err}")
    return written


def load_bundle(path: str | Path, overrides: dict[str, Any] | None = None) -> LatentDiffusionModule:
    """A bundle folder -> LatentDiffusionModule on the CPU, in eval mode, EMA weights in both UNet copies.

    `overrides` replace module arguments (e.g. a text_encoder config pointing at a weights cache)."""
    path = Path(path)
    hparams = {**read_hparams(path), **(overrides or {})}
    module = LatentDiffusionModule(**hparams)
    module.autoencoder.load_state_dict(ae_ckpt.load_model(path / AUTOENCODER_DIR).state_dict())
    state = read_unet_weights(path)
    module.unet.load_state_dict(state)
    module.ema.model.load_state_dict(state)
    conditioner = read_text_weights(path)
    if conditioner is not None:
        module.text_encoder.load_state_dict(conditioner)
        if getattr(module, "text_encoder_ema", None) is not None:
            module.text_encoder_ema.model.load_state_dict(conditioner)
    return module.eval()


def load_ldm(path: str | Path, overrides: dict[str, Any] | None = None) -> LatentDiffusionModule:
    """A bundle folder or a stage=ldm Lightning checkpoint -> LatentDiffusionModule on the CPU, eval mode.

    Sampling and exporting never score: the metric networks (FID's Inception, the CLIP score model), which
    would download weights on an offline node, are not built. The module's settings still name the
    checkpoint's metrics, so an export of it records them as trained.
    """
    hparams = read_hparams(path)  # also refuses a foreign or code-carrying file, in one line
    metrics = hparams.get("metrics")
    # Nor the post-hoc EMA profiles (copies of the UNet that only training updates).
    no_metrics = {"metrics": None, "posthoc_ema": None, **(overrides or {})}
    if Path(path).is_dir():
        module = load_bundle(path, no_metrics)
    else:
        module = LatentDiffusionModule.load_from_checkpoint(str(path), map_location="cpu", autoencoder_path=None,
                                                            weights_only=True, **no_metrics)
    module.hparams["metrics"] = metrics
    module.hparams["posthoc_ema"] = hparams.get("posthoc_ema")
    return module.eval()
