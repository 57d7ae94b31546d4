"""Whole-model file layouts: diffusers StableDiffusionPipeline folders, SD single files, and our export bundle.

`load_pretrained(path)` reads any of the three into one `Pretrained` (UNet, text encoder and autoencoder
weights with their architectures, plus the settings they were trained with), building no model;
`save_pipeline` and `save_single_file` write the parts of a trained module (anything with a
LatentDiffusionModule's attributes) for diffusers, ComfyUI and AUTOMATIC1111. The key maps live with each model
(ldm.checkpoints.unet / autoencoder / text_encoder); this file only assembles them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints import scheduler as sched
from ldm.checkpoints import text_encoder as te
from ldm.checkpoints import unet as unet_ckpt
from ldm.checkpoints.autoencoder import COMPVIS_PREFIX as AE_PREFIX
from ldm.checkpoints.bundle_layout import (
    AUTOENCODER_DIR,
    is_bundle,
    plain,
    read_config,
    read_hparams,
    read_text_weights,
    read_unet_weights,
    sampling_conditioner,
)
from ldm.checkpoints.files import save_safetensors, write_json
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

MODEL_INDEX = "model_index.json"
SD_SCALE_FACTOR = 0.18215
# What a published single file does not say: SD 1 and SD 2(-base) were trained this way.
SD_SETTINGS = {"prediction_type": "epsilon", "schedule": dict(sched.DEFAULT_SCHEDULE)}
META = "ldm."  # our keys in a single file's safetensors metadata (exact settings for our own exports)


@dataclass
class Pretrained:
    """What `model.init_from` starts from. `text_state` None: the text config names a published OpenCLIP model."""

    source: str
    unet_config: dict[str, Any]
    unet_state: dict[str, torch.Tensor]
    text_config: dict[str, Any]
    text_state: dict[str, torch.Tensor] | None
    autoencoder_path: Path
    settings: dict[str, Any] = field(default_factory=dict)  # prediction_type, schedule, scale_factor[, flow]


def load_pretrained(path: str | Path, use_ema: bool = False) -> Pretrained:
    """A diffusers pipeline folder, an SD single file (.ckpt / .safetensors) or our export bundle."""
    path = Path(path)
    if is_bundle(path):
        return _load_bundle(path)
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise FileNotFoundError(f"{path}: neither a diffusers pipeline ({MODEL_INDEX}) nor an ldm export "
                                    f"(unet.json + unet_ema.safetensors)")
        return _load_diffusers(path)
    if path.is_file():
        return _load_single_file(path, use_ema)
    raise FileNotFoundError(f"{path}: no such file or folder")


def _load_bundle(path: Path) -> Pretrained:
    hp = read_hparams(path)
    settings = {k: hp[k] for k in ("prediction_type", "schedule", "scale_factor", "flow") if hp.get(k) is not None}
    return Pretrained(str(path), dict(read_config(path)["unet"]), read_unet_weights(path), dict(hp["text_encoder"]),
                      read_text_weights(path), path / AUTOENCODER_DIR, settings)


def _load_diffusers(path: Path) -> Pretrained:
    index = json.loads((path / MODEL_INDEX).read_text())
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path}: a pipeline folder needs {missing} ({index.get('_class_name')})")
    unet_dir = path / "unet"
    config = unet_ckpt.config_from_diffusers(json.loads((unet_dir / unet_ckpt.DIFFUSERS_CONFIG).read_text()),
                                             str(unet_dir / unet_ckpt.DIFFUSERS_CONFIG))
    state = unet_ckpt.diffusers_to_compvis(unet_ckpt.read_diffusers_weights(unet_dir), config)
    text_config, text_state = te.load_transformers(path / "text_encoder")
    sched_file = path / "scheduler" / "scheduler_config.json"
    settings = sched.settings_from_scheduler(json.loads(sched_file.read_text()), str(sched_file))
    scaling = json.loads((path / "vae" / "config.json").read_text()).get("scaling_factor")  # weights load later
    settings["scale_factor"] = float(scaling or SD_SCALE_FACTOR)
    return Pretrained(str(path), config, state, text_config, text_state, path, settings)


def _load_single_file(path: Path, use_ema: bool) -> Pretrained:
    raw = unet_ckpt.read_state_file(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    unet_state = unet_ckpt.unet_state_from_checkpoint(state, use_ema, str(path))
    text = te.from_compvis(state)
    if not unet_state or text is None or not any(k.startswith("first_stage_model.") for k in state):
        raise ValueError(f"{path}: a Stable Diffusion single file holds model.diffusion_model.*, "
                         f"first_stage_model.* and cond_stage_model.* keys")
    text_state, style = text
    meta = _metadata(path)
    if "text_encoder" in meta:
        text_config = meta["text_encoder"]
    else:  # SD 1: CLIP ViT-L/14, quick-GELU, end-of-text padding; SD 2: OpenCLIP ViT-H, penultimate layer
        shape = te.tower_config(text_state)
        text_config = {"kind": "openclip", "model_name": None, "pretrained": None, **shape,
                       "layer": "last" if style == "sd1" else "penultimate",
                       "act": "quick_gelu" if style == "sd1" else "gelu", "pad_id": te.EOT if style == "sd1" else 0}
    unet_config = meta.get("unet") or unet_ckpt.guess_arch(unet_state)
    settings = {k: meta[k] for k in ("prediction_type", "schedule", "scale_factor") if k in meta}
    settings = {**SD_SETTINGS, "scale_factor": SD_SCALE_FACTOR, **settings}
    return Pretrained(str(path), unet_config, unet_state, text_config, text_state, path, settings)


def _metadata(path: Path) -> dict[str, Any]:
    """Our settings in a single file we exported (safetensors metadata); {} for anything else."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k[len(META):]: json.loads(v) for k, v in meta.items() if k.startswith(META)}


# ---------------------------------------------------------------- writing


def pipeline_text_encoder(module: Any) -> Any:
    """The OpenCLIP tower a pipeline export carries; ValueError (the reason) for models a pipeline cannot express."""
    encoder = sampling_conditioner(module)
    if not isinstance(encoder, OpenCLIPTextEncoder):
        kind = (module.hparams.get("text_encoder") or {}).get("kind")
        raise ValueError(f"text_encoder kind={kind}: StableDiffusionPipeline conditions on CLIP text only "
                         f"(class-conditional and unconditional models have no text encoder to export)")
    sched.scheduler_config(module.hparams.prediction_type, None)  # flow: says why
    if module.unet.config.get("pooled_context"):
        raise ValueError("model.unet.pooled_context: StableDiffusionPipeline passes no class_labels to its UNet; "
                         "load the diffusers UNet alone and pass class_labels=prompt_embeds.mean(dim=1)")
    return encoder


def sd_style(encoder: Any) -> str:
    """sd1: a CLIP-style tower (quick-GELU, end-of-text padding); sd2: an OpenCLIP one."""
    return "sd1" if encoder.act == "quick_gelu" and encoder.pad_id == te.EOT else "sd2"


def save_pipeline(module: Any, directory: str | Path) -> Path:
    """Complete a diffusers StableDiffusionPipeline folder whose unet/ and vae/ are already written.

    model_index.json comes last, so a folder without it was never a pipeline."""
    directory = Path(directory)
    encoder = pipeline_text_encoder(module)
    for part in ("unet", "vae"):
        if not (directory / part / "config.json").is_file():
            raise ValueError(f"no {part}/ was written (see above)")
    te.save_transformers(encoder, directory / "text_encoder")
    te.save_tokenizer(directory / "tokenizer", encoder.context_length, encoder.pad_id)
    hp = module.hparams
    write_json(sched.scheduler_config(hp.prediction_type, dict(hp.schedule or {})),
                directory / "scheduler" / "scheduler_config.json")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": sched._diffusers_version(),
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    write_json(index, directory / MODEL_INDEX)
    return directory


def save_single_file(module: Any, path: str | Path) -> Path:
    """A Stable Diffusion single file (SD 1 or SD 2 key names by the text tower) with the EMA UNet, the
    autoencoder and the text encoder; our settings ride along in the safetensors metadata."""
    encoder = pipeline_text_encoder(module)
    unet = module.ema.model
    state = {unet_ckpt.LDM_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({AE_PREFIX + k: v for k, v in module.autoencoder.state_dict().items()})
    state.update(te.to_compvis(te.tower_state(encoder), sd_style(encoder)))
    hp = plain(dict(module.hparams))
    text_config = {**hp["text_encoder"], "model_name": None, "pretrained": None, "width": encoder.output_dim,
                   "heads": encoder.transformer.resblocks[0].attn.num_heads,
                   "layers": len(encoder.transformer.resblocks), "context_length": encoder.context_length,
                   "act": encoder.act, "pad_id": encoder.pad_id}
    meta = {"unet": plain(unet.config), "text_encoder": text_config, "prediction_type": hp["prediction_type"],
            "schedule": hp.get("schedule"), "scale_factor": float(module.scale_factor)}
    metadata = {"format": "pt", **{META + k: json.dumps(v) for k, v in meta.items()}}
    return save_safetensors(state, Path(path), metadata)

