"""UNet weights in three layouts: ours (CompVis names), Stable Diffusion checkpoints, diffusers folders.

Our parameter names are the CompVis `model.diffusion_model.*` names, so an SD checkpoint loads after
stripping its prefix; diffusers' `UNet2DConditionModel` names are derived from one table of module
prefixes built from the architecture, used in both directions. Every reader is safe (safetensors, or
`torch.load(weights_only=True)`), every writer writes a temporary file and renames it into place.
"""

from __future__ import annotations

import json
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints.files import (  # read_state_file: also imported from here by older code
    atomic_write,
    read_state_file,
    save_safetensors,
    write_json,
)
from ldm.diffusion.unet import PRESETS, UNetModel

LDM_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
OUR_CONFIG, OUR_WEIGHTS, OUR_EMA_WEIGHTS = "unet.json", "unet.safetensors", "unet_ema.safetensors"
DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"

# CompVis ResBlock submodule -> diffusers ResnetBlock2D submodule.
RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# diffusers config values the CompVis UNet computes in only one way: anything else is refused on import.
DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


# ---------------------------------------------------------------- config translation


def diffusers_config(config: dict[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """Our UNet kwargs -> a diffusers `UNet2DConditionModel` config.json (SD 1.x/2.x conventions)."""
    mult, ds_attn = config["channel_mult"], set(config["attention_resolutions"])
    widths = [config["model_channels"] * m for m in mult]
    groups = config.get("norm_num_groups", 32)
    bad = [w for w in widths if w % groups]
    if bad:
        raise ValueError(f"diffusers uses GroupNorm with norm_num_groups={groups} everywhere: every level width must "
                         f"be a multiple of it, got model_channels * channel_mult = {widths}")
    if config.get("context_dim") is None:
        raise ValueError("diffusers UNet2DConditionModel needs a cross-attention width: context_dim is None")
    pooled = bool(config.get("pooled_context"))
    if pooled and config.get("num_classes") is not None:
        raise ValueError("num_classes and pooled_context both need diffusers' one class_embedding: use one")
    attn = [2 ** i in ds_attn for i in range(len(mult))]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    # diffusers' attention_head_dim is the number of heads (a historical misnomer): one number for
    # SD 1.x's fixed head count, one per level for SD 2.x's fixed head width.
    if config.get("num_heads", -1) != -1:
        heads: int | list[int] = config["num_heads"]
    else:
        heads = [w // config["num_head_channels"] for w in widths]
    try:
        diffusers_version = version("diffusers")
    except PackageNotFoundError:
        diffusers_version = "0.30.0"
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers_version,
        "sample_size": sample_size, "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "down_block_types": down, "up_block_types": up, "block_out_channels": widths,
        "layers_per_block": config["num_res_blocks"], "attention_head_dim": heads,
        "cross_attention_dim": config["context_dim"], "use_linear_projection": config["use_linear_in_transformer"],
        "transformer_layers_per_block": config["transformer_depth"], "num_class_embeds": config.get("num_classes"),
        "dropout": config.get("dropout", 0.0), "upcast_attention": False, "norm_num_groups": groups,
        **DIFFUSERS_FIXED,
        # pooled_context: diffusers' "projection" class embedding is the same two-layer MLP added to the time
        # embedding; a diffusers caller passes class_labels=encoder_hidden_states.mean(dim=1).
        "class_embed_type": "projection" if pooled else None,
        "projection_class_embeddings_input_dim": config["context_dim"] if pooled else None,
        # use_scale_shift_norm: the same (1 + scale, shift) on norm2's output, time_emb_proj twice as wide
        "resnet_time_scale_shift": "scale_shift" if config.get("use_scale_shift_norm") else "default",
    }


def config_from_diffusers(dcfg: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """A diffusers `UNet2DConditionModel` config -> our UNet kwargs; refuses what the CompVis UNet cannot do."""
    def fail(key: str, why: str) -> ValueError:
        return ValueError(f"{source}: {key}={dcfg.get(key)!r} is not supported by UNetModel ({why})")

    for key, value in DIFFUSERS_FIXED.items():
        if key == "class_embed_type" and dcfg.get(key) == "projection":
            continue  # pooled_context, checked below
        if key == "resnet_time_scale_shift" and dcfg.get(key) == "scale_shift":
            continue  # use_scale_shift_norm
        got = dcfg.get(key, value)
        values = got if isinstance(got, list | tuple) and not isinstance(value, list | tuple) else [got]
        if any(v != value and not (isinstance(v, int | float) and isinstance(value, int | float)
                                   and float(v) == float(value)) for v in values):
            raise fail(key, f"only {value!r}")
    widths = list(dcfg.get("block_out_channels", (320, 640, 1280, 1280)))
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise fail("block_out_channels", "widths must be multiples of the first")
    down = list(dcfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(dcfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if len(down) != len(widths) or not set(down) <= known:
        raise fail("down_block_types", f"one of {sorted(known)} per block_out_channels entry")
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if up != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        raise fail("up_block_types", "must mirror down_block_types")
    layers = dcfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise fail("layers_per_block", "one int for all levels")
    depth = dcfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list | tuple):
        if len(set(depth)) != 1:
            raise fail("transformer_layers_per_block", "one depth for all levels")
        depth = depth[0]
    context_dim = dcfg.get("cross_attention_dim", 1280)
    if isinstance(context_dim, list | tuple):
        if len(set(context_dim)) != 1:
            raise fail("cross_attention_dim", "one width for all levels")
        context_dim = context_dim[0]
    pooled = dcfg.get("class_embed_type") == "projection"
    if pooled and dcfg.get("projection_class_embeddings_input_dim") != context_dim:
        raise fail("projection_class_embeddings_input_dim", "pooled_context projects the token mean of the "
                   f"context: it must equal cross_attention_dim={context_dim}")
    heads = dcfg.get("num_attention_heads") or dcfg.get("attention_head_dim", 8)
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    # Levels with attention, plus the middle block (which uses the last level's entry).
    used = [i for i, a in enumerate(attn) if a] + [len(widths) - 1]
    if len({heads[i] for i in used}) == 1:
        head_kw = {"num_heads": heads[used[0]], "num_head_channels": -1}
    elif len({widths[i] // heads[i] for i in used}) == 1:
        head_kw = {"num_heads": -1, "num_head_channels": widths[used[0]] // heads[used[0]]}
    else:
        raise fail("attention_head_dim", "needs the same heads or the same head width at every level")
    return {
        "in_channels": dcfg.get("in_channels", 4), "out_channels": dcfg.get("out_channels", 4),
        "model_channels": model_channels, "channel_mult": [w // model_channels for w in widths],
        "num_res_blocks": layers, "attention_resolutions": [2 ** i for i, a in enumerate(attn) if a],
        **head_kw, "transformer_depth": depth, "context_dim": context_dim,
        "use_linear_in_transformer": bool(dcfg.get("use_linear_projection", False)),
        "norm_num_groups": int(dcfg.get("norm_num_groups", 32)),
        "dropout": float(dcfg.get("dropout", 0.0)), "num_classes": dcfg.get("num_class_embeds"),
        "pooled_context": pooled,
        "use_scale_shift_norm": dcfg.get("resnet_time_scale_shift") == "scale_shift",
    }


# ---------------------------------------------------------------- key mapping


def module_table(config: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(CompVis module prefix, diffusers module prefix, is_resnet) for every mapped module."""
    mult, nrb, attn_at = config["channel_mult"], config["num_res_blocks"], set(config["attention_resolutions"])
    table = [("time_embed.0", "time_embedding.linear_1", False), ("time_embed.2", "time_embedding.linear_2", False),
             ("input_blocks.0.0", "conv_in", False), ("out.0", "conv_norm_out", False), ("out.2", "conv_out", False),
             ("label_emb", "class_embedding", False), ("context_embed.0", "class_embedding.linear_1", False),
             ("context_embed.2", "class_embedding.linear_2", False),
             ("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
             ("middle_block.2", "mid_block.resnets.1", True)]
    n = 1
    for level in range(len(mult)):
        attn = 2 ** level in attn_at
        for j in range(nrb):
            table.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", True))
            if attn:
                table.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", False))
            n += 1
        if level != len(mult) - 1:
            table.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
            n += 1
    n = 0
    for u, level in enumerate(reversed(range(len(mult)))):
        attn = 2 ** level in attn_at
        for j in range(nrb + 1):
            table.append((f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", True))
            if attn:
                table.append((f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}", False))
            if level and j == nrb:
                table.append((f"output_blocks.{n}.{1 + attn}.conv", f"up_blocks.{u}.upsamplers.0.conv", False))
            n += 1
    return table


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, dict[str, str] | None]]
            ) -> dict[str, torch.Tensor]:
    """Rename keys by their longest known module prefix; unknown keys pass through (and show up as unexpected)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                new_head, sub = prefixes[head]
                rest = ".".join(parts[cut:])
                if sub is not None:
                    sub_head, _, leaf = rest.rpartition(".")
                    rest = f"{sub.get(sub_head, sub_head)}.{leaf}"
                key = f"{new_head}.{rest}"
                break
        out[key] = value
    return out


def compvis_to_diffusers(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our / CompVis UNet state dict -> diffusers `UNet2DConditionModel` state dict."""
    table = {c: (d, RESNET_RENAMES if res else None) for c, d, res in module_table(config)}
    return _rename(state, table)


def diffusers_to_compvis(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel` state dict -> our / CompVis UNet state dict."""
    inverse = {d: c for c, d in RESNET_RENAMES.items()}
    table = {d: (c, inverse if res else None) for c, d, res in module_table(config)}
    return _rename(state, table)


# ---------------------------------------------------------------- reading


def unet_state_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = False,
                               source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The UNet part of a whole SD / Lightning checkpoint or of a UNet-only state dict, in our key names.

    With `use_ema` the EMA copy is taken when the file has one: CompVis LitEma stores each parameter
    as `model_ema.` + its `diffusion_model.` name with the dots removed.
    """
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    keys = list(state)
    if any(k.startswith(LDM_PREFIX) for k in keys):
        unet = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
        if use_ema and any(k.startswith(EMA_PREFIX) for k in keys):
            flat = {EMA_PREFIX + "diffusion_model" + k.replace(".", ""): k for k in unet}
            ema = {ours: state[f] for f, ours in flat.items() if f in state}
            missing = sorted(set(flat.values()) - set(ema))
            if missing:
                raise ValueError(f"{source}: use_ema=True but the EMA copy lacks {len(missing)} parameters, "
                                 f"e.g. {missing[:5]}")
            unet = {**unet, **ema}
        elif use_ema:
            warnings.warn(f"{source}: use_ema=True but the checkpoint has no EMA weights; using the live ones",
                          stacklevel=3)
        return unet
    if any(k.startswith("unet.") for k in keys):  # a LatentDiffusionModule (Lightning) checkpoint
        prefix = "ema.model." if use_ema and any(k.startswith("ema.model.") for k in keys) else "unet."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _diffusers_dir(path: Path) -> Path | None:
    for d in (path, path / "unet"):
        if (d / DIFFUSERS_CONFIG).is_file() and any(d.glob("diffusion_pytorch_model*")):
            return d
    return None


def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return read_state_file(folder / name)
    index = folder / (DIFFUSERS_WEIGHTS + ".index.json")
    if index.is_file():  # sharded
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_state_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder}: no {DIFFUSERS_WEIGHTS} (or .bin / sharded index) next to {DIFFUSERS_CONFIG}")


def load_into(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> UNetModel:
    """A UNetModel(**config) holding `state`, or an error naming the source and every missing, unexpected
    or misshapen key. The model is built on the meta device and takes the loaded tensors (cast to the
    default float dtype): no random initialisation of weights that are overwritten anyway.
    """
    with torch.device("meta"):
        model = UNetModel(**config)
    own = model.state_dict()
    fixed, bad_shape = {}, []
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            if value.numel() == own[key].numel() and value.squeeze().shape == own[key].squeeze().shape:
                value = value.reshape(own[key].shape)  # 1x1 conv <-> linear projections (SD1 vs SD2 style)
            else:
                bad_shape.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        fixed[key] = value.to(torch.get_default_dtype()) if value.is_floating_point() else value
    missing, unexpected = sorted(set(own) - set(fixed)), sorted(set(fixed) - set(own))
    if missing or unexpected or bad_shape:
        def show(items: list[str]) -> str:
            return f"{len(items)} {items[:8]}{' ...' if len(items) > 8 else ''}"
        raise ValueError(f"{source}: weights do not fit UNetModel({model.config}): missing {show(missing)}, "
                         f"unexpected {show(unexpected)}, wrong shape {show(bad_shape)}")
    model.load_state_dict(fixed, strict=True, assign=True)
    return model


def _merge(base: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    """`arch` over `base`; naming one of num_heads / num_head_channels switches the other off."""
    merged = {**base, **arch}
    for key, other in (("num_heads", "num_head_channels"), ("num_head_channels", "num_heads")):
        if key in arch and other not in arch:
            merged[other] = -1
    return merged


def load_unet(path: str | os.PathLike, use_ema: bool = False, **arch: Any) -> UNetModel:
    """Load a UNet from our export folder, a diffusers folder (or its parent with `unet/`), or a CompVis file.

    The architecture comes from the folder's config when there is one (`arch` overrides its entries),
    else from `arch` on top of the SD 1.5 preset and what the weights' shapes reveal (`guess_arch`).
    """
    path = Path(path)
    if path.is_dir():
        if (path / OUR_CONFIG).is_file():
            meta = json.loads((path / OUR_CONFIG).read_text())
            config = _merge(meta.get("unet", meta), arch)
            names = (OUR_EMA_WEIGHTS, OUR_WEIGHTS) if use_ema else (OUR_WEIGHTS, OUR_EMA_WEIGHTS)
            weights = next((path / n for n in names if (path / n).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{path}: {OUR_CONFIG} but neither {OUR_WEIGHTS} nor {OUR_EMA_WEIGHTS}")
            return load_into(config, read_state_file(weights), str(weights))
        folder = _diffusers_dir(path)
        if folder is None:
            raise FileNotFoundError(f"{path}: neither our export ({OUR_CONFIG} + {OUR_WEIGHTS}) nor a diffusers "
                                    f"UNet folder ({DIFFUSERS_CONFIG} + {DIFFUSERS_WEIGHTS}, or unet/ below it)")
        config = _merge(config_from_diffusers(json.loads((folder / DIFFUSERS_CONFIG).read_text()),
                                              str(folder / DIFFUSERS_CONFIG)), arch)
        state = diffusers_to_compvis(read_diffusers_weights(folder), config)
        return load_into(config, state, str(folder))
    state = unet_state_from_checkpoint(read_state_file(path), use_ema, str(path))
    if "conv_in.weight" in state:  # a diffusers-layout state dict in a single file
        config = _merge(PRESETS["sd15"], arch)
        return load_into(config, diffusers_to_compvis(state, config), str(path))
    return load_into(_merge(guess_arch(state), arch), state, str(path))


def guess_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a CompVis state dict's shapes reveal, over the SD 1.5 preset (SD 2.x when proj_in is linear).

    Head counts are not in the weights: SD 2.x checkpoints are recognised by linear proj_in layers.
    """
    config = dict(PRESETS["sd15"])
    proj_in = state.get("input_blocks.1.1.proj_in.weight")
    if proj_in is not None and proj_in.ndim == 2:
        config = dict(PRESETS["sd21"])
    conv_in, conv_out = state.get("input_blocks.0.0.weight"), state.get("out.2.weight")
    if conv_in is not None:
        config.update(in_channels=conv_in.shape[1], model_channels=conv_in.shape[0])
    if conv_out is not None:
        config["out_channels"] = conv_out.shape[0]
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        config["context_dim"] = to_k.shape[1]
    if "label_emb.weight" in state:
        config["num_classes"] = state["label_emb.weight"].shape[0]
    if "context_embed.0.weight" in state:
        config["pooled_context"] = True
    emb = state.get("input_blocks.1.0.emb_layers.1.weight")
    out = state.get("input_blocks.1.0.out_layers.3.weight")
    if emb is not None and out is not None and emb.shape[0] == 2 * out.shape[0]:
        config["use_scale_shift_norm"] = True  # the embedding projects to a scale and a shift per channel
    config.update(_levels(state, config["model_channels"]))
    return config


def _levels(state: dict[str, torch.Tensor], model_channels: int) -> dict[str, Any]:
    """channel_mult, num_res_blocks, attention_resolutions and transformer_depth from the input blocks' keys."""
    levels: list[list[int]] = [[]]  # input-block indices of each level's res blocks
    n = 1
    while f"input_blocks.{n}.0.op.weight" in state or f"input_blocks.{n}.0.in_layers.0.weight" in state:
        if f"input_blocks.{n}.0.op.weight" in state:
            levels.append([])
        else:
            levels[-1].append(n)
        n += 1
    if n == 1 or not levels[0]:
        return {}
    mult = [state[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"].shape[0] // model_channels for blocks in levels]
    attn = [2 ** i for i, blocks in enumerate(levels) if f"input_blocks.{blocks[0]}.1.norm.weight" in state]
    out: dict[str, Any] = {"channel_mult": mult, "num_res_blocks": len(levels[0]), "attention_resolutions": attn}
    if attn:
        first = levels[attn[0].bit_length() - 1][0]
        depth = 0
        while f"input_blocks.{first}.1.transformer_blocks.{depth}.norm1.weight" in state:
            depth += 1
        out["transformer_depth"] = depth
    return out


# ---------------------------------------------------------------- writing


def save_pretrained(model: UNetModel, directory: str | os.PathLike) -> Path:
    """Our own format: `unet.json` ({"unet": kwargs}) + `unet.safetensors`; weights first, config last."""
    directory = Path(directory)
    save_safetensors(model.state_dict(), directory / OUR_WEIGHTS, {"format": "pt"})
    write_json({"unet": model.config}, directory / OUR_CONFIG)
    return directory


def save_diffusers(model: UNetModel, directory: str | os.PathLike, sample_size: int | None = None) -> Path:
    """A folder `diffusers.UNet2DConditionModel.from_pretrained` loads with no missing or unexpected keys."""
    directory = Path(directory)
    config = diffusers_config(model.config, sample_size)
    save_safetensors(compvis_to_diffusers(model.state_dict(), model.config), directory / DIFFUSERS_WEIGHTS,
                      {"format": "pt"})
    write_json(config, directory / DIFFUSERS_CONFIG)
    return directory


def save_compvis(model: UNetModel, path: str | os.PathLike, ema: UNetModel | None = None) -> Path:
    """A Stable Diffusion (CompVis) checkpoint: `model.diffusion_model.*` keys (+ LitEma `model_ema.*` keys).

    `.safetensors` or a pickled `{"state_dict": ...}` (.ckpt) by the file suffix.
    """
    path = Path(path)
    state = {LDM_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        params = {name for name, _ in ema.named_parameters()}
        state.update({EMA_PREFIX + "diffusion_model" + k.replace(".", ""): v.detach().cpu().contiguous()
                      for k, v in ema.state_dict().items() if k in params})
    if path.suffix == ".safetensors":
        return save_safetensors(state, path, {"format": "pt"})
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
