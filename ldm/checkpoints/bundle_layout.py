"""The stage=ldm export folder's layout: its file names, its settings file, and reading them back.

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

Reading the settings needs no model: sample.py checks its options against them before anything is built.
Building the whole `LatentDiffusionModule` from the folder is `ldm.bundle`'s work, one layer up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file

from ldm.checkpoints.files import load_torch_file, save_safetensors, write_json

BUNDLE_CONFIG = "unet.json"
EMA_WEIGHTS = "unet_ema.safetensors"
TEXT_WEIGHTS = "text_encoder.safetensors"
AUTOENCODER_DIR = "autoencoder"


def is_bundle(path: str | Path) -> bool:
    """A folder written by `write_bundle` (or by an older stage=ldm export, which lacks "module")."""
    path = Path(path)
    return path.is_dir() and (path / BUNDLE_CONFIG).is_file() and (path / EMA_WEIGHTS).is_file()


def plain(value: Any) -> Any:
    """hparams -> JSON: tuples to lists, OmegaConf containers to plain ones."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A weights file of the folder, on the CPU, atomically."""
    return save_safetensors({k: v.detach().cpu() for k, v in state.items()}, path, {"format": "pt"})


def sampling_conditioner(module: Any) -> Any:
    """The conditioner whose weights the folder holds and sampling uses: the EMA copy of a trained one, else the
    (frozen) one itself. `module` is anything with a LatentDiffusionModule's attributes."""
    ema = getattr(module, "text_encoder_ema", None)
    return ema.model if ema is not None else getattr(module, "text_encoder", None)


def write_config(out: Path, unet_config: dict[str, Any], scale_factor: float, hparams: dict[str, Any]) -> Path:
    """unet.json, written last: a folder without it is no bundle."""
    meta = {"unet": plain(unet_config), "scale_factor": float(scale_factor),
            "prediction_type": hparams.get("prediction_type"), "schedule": hparams.get("schedule"),
            "module": hparams}
    return write_json(meta, out / BUNDLE_CONFIG)


def read_config(path: str | Path) -> dict[str, Any]:
    """unet.json as written (the UNet kwargs under "unet")."""
    return json.loads((Path(path) / BUNDLE_CONFIG).read_text())


def read_hparams(path: str | Path) -> dict[str, Any]:
    """The LatentDiffusionModule arguments of a bundle or a Lightning checkpoint, without building anything.

    A checkpoint is read as data only (RefusedFileError for a file that would run code; nothing in it runs)
    and memory-mapped, so this costs little even for a multi-GB file; it lets sample.py check height, width
    and sampler before the model is loaded.
    """
    path = Path(path)
    if path.is_dir():
        meta = read_config(path)
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


def read_unet_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA UNet's tensors, our (CompVis) names."""
    return load_file(str(Path(path) / EMA_WEIGHTS))


def read_text_weights(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The conditioner's tensors; None when the folder has none (a frozen published tower, rebuilt from its name)."""
    file = Path(path) / TEXT_WEIGHTS
    return load_file(str(file)) if file.is_file() else None


def latent_factor(hparams: dict[str, Any]) -> int:
    """Image sides must be multiples of this: the autoencoder's downsampling times the UNet's."""
    ae = 2 ** (len(hparams["autoencoder"]["ch_mult"]) - 1)
    return ae * 2 ** (len(hparams["unet"]["channel_mult"]) - 1)
