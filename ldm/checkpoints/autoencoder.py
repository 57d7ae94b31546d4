"""Every file layout of the first stage: our export, diffusers, Stable Diffusion (CompVis); key maps, loaders, writers.

The one loader, `load_autoencoder(path)`, tells the layouts apart by what `path` holds and returns the model
(`AutoencoderKL`, or `IdentityAutoencoder` for a pixel-space export); `save_autoencoder` writes any of them.
The model classes know nothing of files: their `from_pretrained` / `save_pretrained` hand off to here.
Our `AutoencoderKL` already uses the CompVis parameter names, so a CompVis file only needs its prefix
handled; the diffusers layout is translated key by key (and its 2-D attention weights reshaped to the
1x1 convs CompVis uses). Loading never unpickles arbitrary objects (`torch.load(weights_only=True)`),
and every write goes to a temporary file that is renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.autoencoder.identity import IdentityAutoencoder, is_identity
from ldm.autoencoder.model import AutoencoderKL
from ldm.checkpoints.files import RefusedFileError, atomic_write, load_torch_file

# Our own export: a folder with these two files (an identity export has the config only).
CONFIG_NAME = "autoencoder.json"
WEIGHTS_NAME = "autoencoder.safetensors"
COMPVIS_PREFIX = "first_stage_model."
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
# Stable Diffusion v1/v2 first-stage ddconfig: the architecture assumed for a CompVis file where the
# tensors cannot say it (resolution only places attention; dropout is not stored).
SD_DDCONFIG: dict[str, Any] = dict(embed_dim=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_resolutions=[], dropout=0.0, in_channels=3, out_ch=3, resolution=256,
                                   z_channels=4, double_z=True, norm_num_groups=32)
SD_SCALING_FACTOR = 0.18215  # diffusers' default when a config.json does not say
# Keys in CompVis VAE-only files that are not autoencoder weights (the published kl-f8 file keeps its
# training loss's LPIPS and discriminator; ema checkpoints keep counters).
_IGNORED_COMPVIS_PREFIXES = ("loss.", "model_ema.")
_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


@dataclass
class LoadedAutoencoder:
    """A loaded autoencoder plus what the file said about its latent scale (None where it said nothing)."""

    model: AutoencoderKL | IdentityAutoencoder
    format: str  # "ldm" | "diffusers" | "compvis" | "identity"
    source: Path
    scaling_factor: float | None = None
    shift_factor: float | None = None


# ---- key mapping ---------------------------------------------------------------------------------------

_RESNET_TO_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                        "nin_shortcut": "conv_shortcut"}
_RESNET_FROM_DIFFUSERS = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.14 stored query/key/value/proj_attn; accept them on load.
_ATTN_FROM_DIFFUSERS = {**{v: k for k, v in _ATTN_TO_DIFFUSERS.items()},
                        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_LINEAR_COMPVIS = ("q", "k", "v", "proj_out")


def _num_levels(keys: Mapping[str, Any] | set[str], marker: str) -> int:
    """Number of decoder levels, counted from keys like `decoder.up.3.` / `decoder.up_blocks.3.`."""
    found = (k[len(marker):].split(".", 1)[0] for k in keys if k.startswith(marker))
    levels = {int(level) for level in found if level.isdigit()}
    return max(levels) + 1 if levels else 0


def _compvis_key_to_diffusers(key: str, num_up: int) -> str | None:
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder") or not rest:
        return None
    head, leaf = rest[0], rest[-1]
    if head in ("conv_in", "conv_out") and len(rest) == 2:
        return key
    if head == "norm_out" and len(rest) == 2:
        return f"{side}.conv_norm_out.{leaf}"
    if head == "mid" and len(rest) == 4:
        if rest[1] in ("block_1", "block_2") and rest[2] in _RESNET_TO_DIFFUSERS:
            return f"{side}.mid_block.resnets.{int(rest[1][-1]) - 1}.{_RESNET_TO_DIFFUSERS[rest[2]]}.{leaf}"
        if rest[1] == "attn_1" and rest[2] in _ATTN_TO_DIFFUSERS:
            return f"{side}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[rest[2]]}.{leaf}"
        return None
    if (side, head) in (("encoder", "down"), ("decoder", "up")) and len(rest) >= 5 and rest[1].isdigit():
        level = int(rest[1])
        prefix = f"{side}.down_blocks.{level}" if head == "down" else f"{side}.up_blocks.{num_up - 1 - level}"
        kind = rest[2]
        if kind == "block" and len(rest) == 6 and rest[4] in _RESNET_TO_DIFFUSERS:
            return f"{prefix}.resnets.{rest[3]}.{_RESNET_TO_DIFFUSERS[rest[4]]}.{leaf}"
        if kind == "attn" and len(rest) == 6 and rest[4] in _ATTN_TO_DIFFUSERS:
            return f"{prefix}.attentions.{rest[3]}.{_ATTN_TO_DIFFUSERS[rest[4]]}.{leaf}"
        if kind in ("downsample", "upsample") and rest[3] == "conv" and len(rest) == 5:
            return f"{prefix}.{kind}rs.0.conv.{leaf}"  # downsamplers / upsamplers
    return None


def _diffusers_key_to_compvis(key: str, num_up: int) -> str | None:
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder") or not rest:
        return None
    head, leaf = rest[0], rest[-1]
    if head in ("conv_in", "conv_out") and len(rest) == 2:
        return key
    if head == "conv_norm_out" and len(rest) == 2:
        return f"{side}.norm_out.{leaf}"

    def inner(kind: str, index: str, names: list[str]) -> str | None:
        """Translate `resnets.j.<name>` / `attentions.j.<name>` below a block; None if unknown."""
        if kind == "resnets" and len(names) == 1 and names[0] in _RESNET_FROM_DIFFUSERS:
            return f"block.{index}.{_RESNET_FROM_DIFFUSERS[names[0]]}"
        name = ".".join(names)
        if kind == "attentions" and name in _ATTN_FROM_DIFFUSERS:
            return f"attn.{index}.{_ATTN_FROM_DIFFUSERS[name]}"
        return None

    if head == "mid_block" and len(rest) >= 5:
        mapped = inner(rest[1], rest[2], rest[3:-1])
        if mapped is None or rest[2] not in ("0", "1") or (mapped.startswith("attn") and rest[2] != "0"):
            return None
        kind, index, name = mapped.split(".", 2)
        mid_name = f"block_{int(index) + 1}" if kind == "block" else "attn_1"
        return f"{side}.mid.{mid_name}.{name}.{leaf}"
    if (side, head) in (("encoder", "down_blocks"), ("decoder", "up_blocks")) and len(rest) >= 5:
        if not rest[1].isdigit():
            return None
        level = int(rest[1]) if head == "down_blocks" else num_up - 1 - int(rest[1])
        prefix = f"{side}.{'down' if head == 'down_blocks' else 'up'}.{level}"
        if rest[2] in ("downsamplers", "upsamplers") and rest[3:5] == ["0", "conv"] and len(rest) == 6:
            return f"{prefix}.{rest[2][:-2]}.conv.{leaf}"
        mapped = inner(rest[2], rest[3], rest[4:-1])
        return None if mapped is None else f"{prefix}.{mapped}.{leaf}"
    return None


def _is_attn_linear(compvis_key: str) -> bool:
    """Only attention layers have q/k/v/proj_out in the CompVis VAE; their weights are 1x1 convs there."""
    parts = compvis_key.split(".")
    return parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in _ATTN_LINEAR_COMPVIS


def _reject(source: str, unexpected: list[str], what: str) -> None:
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected {what} keys: {_show(unexpected)}")


def _show(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def compvis_to_diffusers(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """CompVis VAE keys (`encoder.down.0.block.0...`) -> diffusers `AutoencoderKL` keys, attention as linear."""
    num_up = _num_levels(state, "decoder.up.")
    out, unexpected = {}, []
    for key, tensor in state.items():
        new = _compvis_key_to_diffusers(key, num_up)
        if new is None:
            unexpected.append(key)
            continue
        if _is_attn_linear(key) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[new] = tensor
    _reject(source, unexpected, "CompVis autoencoder")
    return out


def diffusers_to_compvis(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` keys (current or pre-0.14 attention names) -> CompVis keys, attention as 1x1 conv."""
    num_up = _num_levels(state, "decoder.up_blocks.")
    out, unexpected = {}, []
    for key, tensor in state.items():
        new = _diffusers_key_to_compvis(key, num_up)
        if new is None:
            unexpected.append(key)
            continue
        if _is_attn_linear(new) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor
    _reject(source, unexpected, "diffusers autoencoder")
    return out


# ---- config translation --------------------------------------------------------------------------------

def ddconfig_to_diffusers(config: Mapping[str, Any], scaling_factor: float | None = None,
                          shift_factor: float | None = None) -> dict[str, Any]:
    """Our/CompVis ddconfig (+embed_dim) -> a diffusers `AutoencoderKL` config.json dict.

    diffusers ties z_channels to embed_dim (one `latent_channels`) and always doubles z, so configs
    outside that are refused rather than exported as a model that computes something else.
    """
    if config.get("z_channels", 4) != config.get("embed_dim", 4):
        raise ValueError(f"diffusers needs z_channels == embed_dim (one latent_channels), got "
                         f"z_channels={config.get('z_channels')} embed_dim={config.get('embed_dim')}")
    if not config.get("double_z", True):
        raise ValueError("diffusers AutoencoderKL always has double_z=True")
    ch, ch_mult = int(config.get("ch", 128)), [int(m) for m in config.get("ch_mult", (1, 2, 4, 4))]
    resolution = int(config.get("resolution", 256))
    attn = {int(r) for r in config.get("attn_resolutions", ())}
    attn_level = [resolution // 2**i in attn for i in range(len(ch_mult))]
    try:
        from importlib.metadata import version

        diffusers_version = version("diffusers")
    except Exception:  # the export does not need diffusers installed
        diffusers_version = "0.30.0"
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": diffusers_version,
        "act_fn": "silu",
        "block_out_channels": [ch * m for m in ch_mult],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn_level],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn_level)],
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_ch", 3)),
        "latent_channels": int(config.get("embed_dim", 4)),
        "layers_per_block": int(config.get("num_res_blocks", 2)),
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "sample_size": resolution,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    if scaling_factor is not None:
        out["scaling_factor"] = float(scaling_factor)
    if shift_factor is not None:
        out["shift_factor"] = float(shift_factor)
    return out


def diffusers_to_ddconfig(config: Mapping[str, Any], source: str = "config") -> tuple[dict[str, Any], float]:
    """A diffusers `AutoencoderKL` config -> (our ddconfig kwargs, scaling_factor to use as scale_factor).

    Missing keys take diffusers' own defaults, so a minimal config.json means what it means to diffusers.
    """
    def refuse(why: str) -> ValueError:
        return ValueError(f"{source}: cannot load as a CompVis KL autoencoder: {why}")

    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise refuse(f"_class_name is {config['_class_name']!r}, not 'AutoencoderKL'")
    if config.get("act_fn", "silu") != "silu":
        raise refuse(f"act_fn={config['act_fn']!r} (only silu)")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not config.get(flag, True):
            raise refuse(f"{flag}=false")
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if not (len(channels) == len(down) == len(up)):
        raise refuse(f"{len(channels)} block_out_channels but {len(down)} down and {len(up)} up block types")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise refuse(f"block_out_channels {channels} are not multiples of the first")
    known_down = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    known_up = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    if unknown := [t for t in down if t not in known_down] + [t for t in up if t not in known_up]:
        raise refuse(f"unsupported block types {unknown}")
    attn_level = [known_down[t] for t in down]
    if attn_level != [known_up[t] for t in reversed(up)]:
        raise refuse(f"attention in down blocks {down} and up blocks {up} is not at the same resolutions")
    size = config.get("sample_size", 32)
    resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    latent = int(config.get("latent_channels", 4))
    ddconfig = dict(embed_dim=latent, ch=ch, ch_mult=[c // ch for c in channels],
                    num_res_blocks=int(config.get("layers_per_block", 1)),
                    attn_resolutions=[resolution // 2**i for i, a in enumerate(attn_level) if a], dropout=0.0,
                    in_channels=int(config.get("in_channels", 3)), out_ch=int(config.get("out_channels", 3)),
                    resolution=resolution, z_channels=latent, double_z=True,
                    norm_num_groups=int(config.get("norm_num_groups", 32)))
    scaling = config.get("scaling_factor")
    return ddconfig, float(SD_SCALING_FACTOR if scaling is None else scaling)


def infer_ddconfig(state: Mapping[str, torch.Tensor], resolution: int = 256,
                   source: str = "state dict") -> dict[str, Any]:
    """Read ch, ch_mult, num_res_blocks, z_channels, embed_dim, double_z, in/out channels and attention
    levels off CompVis tensor shapes, so a bare .ckpt/.safetensors needs no hand-written config."""
    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"{source}: no key {key!r}; not a CompVis KL autoencoder "
                             f"(first keys: {_show(sorted(state), 6)})")
        return state[key]

    conv_in = get("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _num_levels(state, "encoder.down.")
    blocks = {k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")}
    if levels == 0 or not blocks:
        raise ValueError(f"{source}: no encoder.down.0.block.* keys; not a CompVis KL autoencoder")
    num_res_blocks = len(blocks)
    ch_mult = [int(get(f"encoder.down.{i}.block.{num_res_blocks - 1}.conv2.weight").shape[0]) // ch
               for i in range(levels)]
    z_channels = int(get("decoder.conv_in.weight").shape[1])
    attn = sorted({int(k.split(".")[2]) for k in state
                   if k.startswith(("encoder.down.", "decoder.up.")) and k.split(".")[3] == "attn"})
    return dict(embed_dim=int(get("post_quant_conv.weight").shape[1]), ch=ch, ch_mult=ch_mult,
                num_res_blocks=num_res_blocks, attn_resolutions=[resolution // 2**i for i in attn], dropout=0.0,
                in_channels=in_channels, out_ch=int(get("decoder.conv_out.weight").shape[0]),
                resolution=resolution, z_channels=z_channels,
                double_z=int(get("encoder.conv_out.weight").shape[0]) == 2 * z_channels, norm_num_groups=32)


# ---- reading --------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path, vae_only: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or a torch pickle (.ckpt/.pt/.bin), the latter restricted to plain
    tensors and containers (`weights_only=True`): a checkpoint is data, never code to run.

    With `vae_only`, a whole SD checkpoint yields only its `first_stage_model.*` tensors, and the rest
    (a multi-GB UNet and text encoder) is never read into memory: safetensors are opened lazily and
    zip-format pickles memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder weights at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if vae_only and any(k.startswith(COMPVIS_PREFIX) for k in keys):
                    keys = [k for k in keys if k.startswith(COMPVIS_PREFIX)]
                return {k: f.get_tensor(k) for k in keys}
        except Exception as err:  # SafetensorError: bad header, truncated file
            raise ValueError(f"{path}: not a readable .safetensors file: {err}") from err
    try:
        obj = load_torch_file(path)
    except RefusedFileError as err:
        raise ValueError(f"{err} (convert it to .safetensors)") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _looks_diffusers(keys: Mapping[str, Any]) -> bool:
    return any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in keys)


def compvis_vae_state(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """The autoencoder's CompVis-named tensors out of a whole SD checkpoint (`first_stage_model.*`),
    a VAE-only CompVis file (dropping `loss.*`), or a single diffusers-layout VAE file."""
    if any(k.startswith(COMPVIS_PREFIX) for k in state):
        state = {k[len(COMPVIS_PREFIX):]: v for k, v in state.items() if k.startswith(COMPVIS_PREFIX)}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_COMPVIS_PREFIXES)}
    if _looks_diffusers(state):
        return diffusers_to_compvis(state, source)
    return dict(state)


def _build(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> AutoencoderKL:
    """Construct the model and load `state` strictly, naming the file and every missing/unexpected key."""
    try:
        model = AutoencoderKL(**config)
    except TypeError as err:
        raise TypeError(f"{source}: bad autoencoder arguments {dict(config)}: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_show(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_show(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches: {_show(shapes)}")
        arch = {k: config[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim",
                                       "attn_resolutions") if k in config}
        raise ValueError(f"{source}: weights do not fit AutoencoderKL({arch}): " + "; ".join(problems))
    model.load_state_dict(state)
    return model


# ---- loaders --------------------------------------------------------------------------------------------

def read_identity_export(path: str | Path) -> IdentityAutoencoder | None:
    """The identity autoencoder when `path` is its export (autoencoder.json with kind identity), else None."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return IdentityAutoencoder(**config) if is_identity(config) else None


def load_ldm_export(path: str | Path, **arch: Any) -> AutoencoderKL:
    """Our own export: config from autoencoder.json (updated by `arch`), weights loaded strictly."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = directory / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"no autoencoder weights at {weights}")
    config = json.loads((directory / CONFIG_NAME).read_text()) if (directory / CONFIG_NAME).exists() else {}
    config.update(arch)
    model = AutoencoderKL(**config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise RuntimeError(f"{weights}: {err}") from err
    return model


def load_compvis(path: str | Path, **arch: Any) -> LoadedAutoencoder:
    """A CompVis .ckpt/.safetensors: whole SD checkpoint or VAE-only. The architecture is read off the
    tensor shapes; `arch` (ddconfig keys, e.g. resolution, attn_resolutions) overrides what was read."""
    path = Path(path)
    state = compvis_vae_state(read_state_dict(path, vae_only=True), str(path))
    config = infer_ddconfig(state, int(arch.get("resolution", SD_DDCONFIG["resolution"])), str(path))
    config.update(arch)
    return LoadedAutoencoder(_build(config, state, str(path)), "compvis", path)


def diffusers_dir(path: str | Path) -> Path | None:
    """The folder holding a diffusers VAE's config.json: `path` itself or its `vae/` (a pipeline folder)."""
    path = Path(path)
    for folder in (path, path / "vae"):
        if (folder / DIFFUSERS_CONFIG).is_file() and any((folder / w).is_file() for w in DIFFUSERS_WEIGHTS):
            return folder
    return None


def load_diffusers(path: str | Path, weights: str | Path | None = None, **arch: Any) -> LoadedAutoencoder:
    """A diffusers `AutoencoderKL` folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline
    folder with a `vae/` subfolder; `weights` picks one of its weight files (default: the fp32 one).
    `arch` overrides ddconfig keys (rarely useful: dropout)."""
    path = Path(path)
    folder = diffusers_dir(path)
    if folder is None:
        raise FileNotFoundError(f"no autoencoder weights at {path}: expected {DIFFUSERS_CONFIG} and "
                                f"{DIFFUSERS_WEIGHTS[0]} there or in {path / 'vae'}")
    config_file = folder / DIFFUSERS_CONFIG
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON: {err}") from err
    config, scaling = diffusers_to_ddconfig(raw, str(config_file))
    config.update(arch)
    if weights is None:
        weights = next(folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file())
    weights = Path(weights)
    state = diffusers_to_compvis(read_state_dict(weights), str(weights))
    shift = raw.get("shift_factor")
    return LoadedAutoencoder(_build(config, state, str(weights)), "diffusers", folder, scaling,
                             None if shift is None else float(shift))


def load_autoencoder(path: str | Path, **arch: Any) -> LoadedAutoencoder:
    """Any of our export folder (a KL or an identity one), a diffusers folder, or a CompVis file, told apart
    by what `path` holds."""
    path = Path(path)
    if path.is_dir():
        identity = read_identity_export(path)
        if identity is not None:  # pixel space: a config, no weights
            return LoadedAutoencoder(identity, "identity", path, identity.scaling_factor)
        if (path / WEIGHTS_NAME).is_file():
            return LoadedAutoencoder(load_ldm_export(path, **arch), "ldm", path)
        if diffusers_dir(path) is not None:
            return load_diffusers(path, **arch)
        raise FileNotFoundError(f"no autoencoder weights at {path}: expected {WEIGHTS_NAME} (+{CONFIG_NAME}), "
                                f"or a diffusers folder ({DIFFUSERS_CONFIG} + {DIFFUSERS_WEIGHTS[0]}, "
                                f"or a vae/ subfolder)")
    if path.is_file() and (path.parent / CONFIG_NAME).is_file() and path.suffix == ".safetensors":
        return LoadedAutoencoder(load_ldm_export(path, **arch), "ldm", path)
    if path.name in DIFFUSERS_WEIGHTS and diffusers_dir(path.parent) == path.parent:
        return load_diffusers(path.parent, path, **arch)  # the weights file of a diffusers folder: use its config
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder weights at {path}")
    if path.suffix not in _FILE_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected one of {_FILE_SUFFIXES})")
    return load_compvis(path, **arch)


def load_model(path: str | Path, **arch: Any) -> AutoencoderKL | IdentityAutoencoder:
    """`load_autoencoder`'s model, keeping the latent scale the file declared as `model.scaling_factor`
    (what `AutoencoderKL.from_pretrained` returns). `arch` overrides ddconfig keys."""
    loaded = load_autoencoder(path, **arch)
    loaded.model.scaling_factor = loaded.scaling_factor
    return loaded.model


# ---- exporters ------------------------------------------------------------------------------------------

def _cpu_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def _check_diffusers_norms(model: AutoencoderKL) -> None:
    """diffusers uses one group count everywhere; ours shrinks it for narrow layers, which diffusers can't."""
    groups = int(model.config.get("norm_num_groups", 32))
    odd = [f"{name} ({m.num_groups} groups)" for name, m in model.named_modules()
           if isinstance(m, nn.GroupNorm) and (m.num_groups != groups or m.eps != 1e-6)]
    if odd:
        raise ValueError(f"cannot export to diffusers: its AutoencoderKL uses norm_num_groups={groups} with "
                         f"eps 1e-6 in every GroupNorm, but these differ (channels not a multiple of "
                         f"{groups}?): {_show(odd, 4)}")


def save_diffusers(model: AutoencoderKL, directory: str | Path, scaling_factor: float | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors that `diffusers.AutoencoderKL.from_pretrained`
    loads with no missing or unexpected keys. `scaling_factor` defaults to the model's own, if it has one."""
    directory = Path(directory)
    _check_diffusers_norms(model)
    scaling = scaling_factor if scaling_factor is not None else getattr(model, "scaling_factor", None)
    config = ddconfig_to_diffusers(model.config, scaling)
    state = _cpu_state(compvis_to_diffusers(model.state_dict(), "model"), dtype)
    atomic_write(directory / DIFFUSERS_WEIGHTS[0], lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    atomic_write(directory / DIFFUSERS_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def save_compvis(model: AutoencoderKL, path: str | Path, prefix: str = "",
                 dtype: torch.dtype | None = None) -> Path:
    """Write CompVis-named weights: `.safetensors` (flat) or `.ckpt` (`{"state_dict": ...}`, what CompVis
    and A1111 read). `prefix="first_stage_model."` makes the layout of a whole SD checkpoint."""
    path = Path(path)
    state = {prefix + k: v for k, v in _cpu_state(model.state_dict(), dtype).items()}
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, str(tmp)))
    raise ValueError(f"{path}: CompVis export needs a .safetensors or .ckpt file name")


def save_ldm(model: AutoencoderKL | IdentityAutoencoder, directory: str | Path) -> Path:
    """Our own layout, what stage 2 reads: autoencoder.safetensors + autoencoder.json (the config alone for
    the identity, which has no weights)."""
    directory = Path(directory)
    if not isinstance(model, IdentityAutoencoder):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(model.config, indent=2)))
    return directory


def save_autoencoder(model: AutoencoderKL | IdentityAutoencoder, directory: str | Path, format: str = "ldm",
                     **kwargs: Any) -> Path:
    """Write `model` in the layout `format` names ("ldm", "diffusers", "compvis"); see
    `AutoencoderKL.save_pretrained` for the files and the keyword arguments of each."""
    if format == "ldm":
        return save_ldm(model, directory)
    if isinstance(model, IdentityAutoencoder):
        raise ValueError(f"the identity autoencoder has no {format} layout")
    savers = {"diffusers": save_diffusers, "compvis": save_compvis}
    if format not in savers:
        raise ValueError(f"unknown autoencoder export format {format!r}: ldm | diffusers | compvis")
    return savers[format](model, directory, **kwargs)
