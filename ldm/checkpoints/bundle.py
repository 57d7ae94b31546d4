"""The stage=ldm deliverable: one folder that sample.py loads and outside tools read.

```
export/
  unet.json                 {"unet": UNet kwargs, "scale_factor", "prediction_type", "schedule",
                             "module": every LatentDiffusionModule argument}
  unet_ema.safetensors      EMA UNet weights, our (CompVis) names: UNetModel.from_pretrained(export, use_ema=True)
  autoencoder/              our autoencoder export: AutoencoderKL.from_pretrained(export / "autoencoder")
  text_encoder.safetensors  the conditioner (EMA copy when it trained), unless it is a frozen published OpenCLIP model
  diffusers/                a StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/ (CLIPTextModel),
                            tokenizer/ (CLIPTokenizer), scheduler/ (DDIMScheduler sampling as our DDIM)
  sd.safetensors            a Stable Diffusion single file (SD 1 or SD 2 key names) for ComfyUI and AUTOMATIC1111
  compvis/unet.safetensors, compvis/vae.safetensors    Stable Diffusion (CompVis) key names
```

A Lightning checkpoint and a bundle load into the same `LatentDiffusionModule`, so sampling does not care
which one it was given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints.files import load_torch_file

BUNDLE_CONFIG = "unet.json"
EMA_WEIGHTS = "unet_ema.safetensors"
TEXT_WEIGHTS = "text_encoder.safetensors"


def is_bundle(path: str | Path) -> bool:
    """A folder written by `write_bundle` (or by an older stage=ldm export, which lacks "module")."""
    path = Path(path)
    return path.is_dir() and (path / BUNDLE_CONFIG).is_file() and (path / EMA_WEIGHTS).is_file()


def plain(value: Any) -> Any:
    """hparams -> JSON: tuples to lists, OmegaConf containers to plain ones."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from ldm.checkpoints.files import atomic_write

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"format": "pt"}))


def write_bundle(module: Any, out: str | Path, outside_layouts: bool = True) -> Path:
    """Write a trained LatentDiffusionModule as the folder above (EMA UNet weights).

    The diffusers and CompVis copies are skipped with a printed reason when the architecture cannot be
    expressed there (e.g. diffusers needs level widths that are multiples of 32).
    """
    from ldm.checkpoints.files import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = module.ema.model
    _save_tensors(unet.state_dict(), out / EMA_WEIGHTS)
    module.autoencoder.save_pretrained(out / "autoencoder")
    hparams = plain(dict(module.hparams))
    conditioner = sampling_conditioner(module)
    if conditioner is not None and not _is_published_frozen(hparams.get("text_encoder") or {}):
        _save_tensors(conditioner.state_dict(), out / TEXT_WEIGHTS)
    meta = {"unet": plain(unet.config), "scale_factor": float(module.scale_factor),
            "prediction_type": hparams.get("prediction_type"), "schedule": hparams.get("schedule"),
            "module": hparams}
    atomic_write(out / BUNDLE_CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    if outside_layouts:
        write_outside_layouts(module, out)
    return out


def sampling_conditioner(module: Any) -> Any:
    """The conditioner sampling uses: the EMA copy of a trained one, else the (frozen) one itself."""
    ema = getattr(module, "text_encoder_ema", None)
    return ema.model if ema is not None else getattr(module, "text_encoder", None)


def _is_published_frozen(config: dict[str, Any]) -> bool:
    """Frozen published OpenCLIP weights are rebuilt from their name; saving 1-2 GB again buys nothing."""
    from ldm.conditioning import rebuilt_from_name

    return rebuilt_from_name(config)


def write_outside_layouts(module: Any, out: str | Path) -> list[Path]:
    """diffusers folders and CompVis safetensors of the EMA UNet and the autoencoder, and (when a
    StableDiffusionPipeline can express the model) the whole pipeline and an SD single file."""
    from ldm.checkpoints import autoencoder as ae_ckpt
    from ldm.checkpoints import pipeline
    from ldm.checkpoints import unet as unet_ckpt

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


def read_hparams(path: str | Path) -> dict[str, Any]:
    """The LatentDiffusionModule arguments of a bundle or a Lightning checkpoint, without building anything.

    A checkpoint is read as data only (RefusedFileError for a file that would run code; nothing in it runs)
    and memory-mapped, so this costs little even for a multi-GB file; it lets sample.py check height, width
    and sampler before the model is loaded.
    """
    path = Path(path)
    if path.is_dir():
        meta = json.loads((path / BUNDLE_CONFIG).read_text())
        if "module" not in meta:
            raise ValueError(f"{path}: an export from before bundles carried the model's settings; "
                             f"re-export it from its checkpoint: python -m ldm.export --ckpt RUN/checkpoints/last.ckpt "
                             f"--out {path}")
        return {**meta["module"], "scale_factor": meta["scale_factor"]}
    ckpt = load_torch_file(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "unet" not in hparams:
        raise ValueError(f"{path}: not a stage=ldm Lightning checkpoint (no LatentDiffusionModule hyper_parameters)")
    return plain(dict(hparams))


def latent_factor(hparams: dict[str, Any]) -> int:
    """Image sides must be multiples of this: the autoencoder's downsampling times the UNet's."""
    ae = 2 ** (len(hparams["autoencoder"]["ch_mult"]) - 1)
    return ae * 2 ** (len(hparams["unet"]["channel_mult"]) - 1)


def load_bundle(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """A bundle folder -> LatentDiffusionModule on the CPU, in eval mode, EMA weights in both UNet copies.

    `overrides` replace module arguments (e.g. a text_encoder config pointing at a weights cache)."""
    from safetensors.torch import load_file

    from ldm.autoencoder.model import AutoencoderKL
    from ldm.diffusion.module import LatentDiffusionModule

    path = Path(path)
    hparams = {**read_hparams(path), **(overrides or {})}
    module = LatentDiffusionModule(**hparams)
    module.autoencoder.load_state_dict(AutoencoderKL.from_pretrained(path / "autoencoder").state_dict())
    state = load_file(str(path / EMA_WEIGHTS))
    module.unet.load_state_dict(state)
    module.ema.model.load_state_dict(state)
    if (path / TEXT_WEIGHTS).is_file():
        conditioner = load_file(str(path / TEXT_WEIGHTS))
        module.text_encoder.load_state_dict(conditioner)
        if getattr(module, "text_encoder_ema", None) is not None:
            module.text_encoder_ema.model.load_state_dict(conditioner)
    return module.eval()


def load_ldm(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
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
        from ldm.diffusion.module import LatentDiffusionModule

        module = LatentDiffusionModule.load_from_checkpoint(str(path), map_location="cpu", autoencoder_path=None,
                                                            weights_only=True, **no_metrics)
    module.hparams["metrics"] = metrics
    module.hparams["posthoc_ema"] = hparams.get("posthoc_ema")
    return module.eval()
