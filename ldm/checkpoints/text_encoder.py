"""Text-encoder weights in three layouts: OpenCLIP (ours), transformers `CLIPTextModel`, CompVis single files.

One table (`key_table`) pairs every OpenCLIP text-tower tensor with its `CLIPTextModel` name; the CompVis
names are one of the two with a prefix: SD 1 checkpoints hold a transformers model
(`cond_stage_model.transformer.text_model.*`), SD 2 checkpoints an OpenCLIP one (`cond_stage_model.model.*`).
The same table converts in both directions. Our text tower stays OpenCLIP at run time; transformers is never
imported here: its config.json and the tokenizer files are written as plain JSON/text.

SD 2's diffusers folders hold the OpenCLIP ViT-H tower cut after its penultimate block (23 of 24 layers, read
at the last layer). On import we append an identity block and read the penultimate layer, so a later export
to an SD 2 single file has the 24 blocks ComfyUI and A1111 expect, and an export to transformers drops it again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints.files import atomic_write, read_state_file, save_safetensors, write_json

HF_PREFIX = "text_model."  # transformers < 5.6 nest CLIPTextModel's weights under it, and published files do
COMPVIS_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}
SOT, EOT = 49406, 49407
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

# (OpenCLIP name, CLIPTextModel name) of tensors outside the blocks, and of each block's submodules.
GLOBAL_NAMES = [("token_embedding.weight", "embeddings.token_embedding.weight"),
                ("positional_embedding", "embeddings.position_embedding.weight"),
                ("ln_final.weight", "final_layer_norm.weight"), ("ln_final.bias", "final_layer_norm.bias")]
BLOCK_NAMES = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
               ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
# OpenCLIP packs q, k, v into one projection; transformers keeps three.
QKV_OPENCLIP, QKV_HF = "attn.in_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def key_table(num_layers: int) -> list[tuple[str, str | tuple[str, str, str]]]:
    """(OpenCLIP tensor name, CLIPTextModel tensor name, or the q/k/v names a packed projection splits into)."""
    table: list[tuple[str, str | tuple[str, str, str]]] = list(GLOBAL_NAMES)
    for i in range(num_layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            table += [(f"{ours}{o}.{leaf}", f"{theirs}{t}.{leaf}") for o, t in BLOCK_NAMES]
            table.append((f"{ours}{QKV_OPENCLIP}_{leaf}", tuple(f"{theirs}{t}.{leaf}" for t in QKV_HF)))
    return table


def num_layers_in(state: dict[str, torch.Tensor]) -> int:
    """Blocks in an OpenCLIP or transformers state dict (the highest block index + 1)."""
    found = [int(m.group(1)) for k in state for m in [re.search(r"(?:resblocks|layers)\.(\d+)\.", k)] if m]
    return max(found) + 1 if found else 0


def openclip_to_transformers(state: dict[str, torch.Tensor], num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> CLIPTextModel names (with the `text_model.` prefix published files use).

    `num_layers` below the tower's depth drops the last blocks (SD 2's penultimate-layer cut)."""
    depth = num_layers_in(state) if num_layers is None else num_layers
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in key_table(depth):
        value = state[ours]
        if isinstance(theirs, tuple):
            for name, part in zip(theirs, value.chunk(3), strict=True):
                out[HF_PREFIX + name] = part.contiguous()
        else:
            out[HF_PREFIX + theirs] = value
    return out


def transformers_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel names (with or without `text_model.`) -> OpenCLIP text tower; unknown keys are refused."""
    plain = {k.removeprefix(HF_PREFIX): v for k, v in state.items()}
    plain.pop("embeddings.position_ids", None)  # a buffer older transformers saved
    plain.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's head: not a token feature
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in key_table(num_layers_in(plain)):
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        missing = [n for n in names if n not in plain]
        if missing:
            raise ValueError(f"CLIPTextModel weights lack {missing}")
        out[ours] = torch.cat([plain[n] for n in names]) if len(names) > 1 else plain[names[0]]
        used.update(names)
    unexpected = sorted(set(plain) - used)
    if unexpected:
        raise ValueError(f"CLIPTextModel weights have keys no OpenCLIP text tower has: {unexpected[:8]}")
    return out


def to_compvis(state: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> a Stable Diffusion single file's `cond_stage_model.*` keys (style sd1 | sd2)."""
    if style == "sd1":
        return {COMPVIS_PREFIX["sd1"] + k.removeprefix(HF_PREFIX): v
                for k, v in openclip_to_transformers(state).items()}
    return {COMPVIS_PREFIX["sd2"] + k: v for k, v in state.items()}


def from_compvis(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str] | None:
    """A single file's text encoder as an OpenCLIP tower and its style (sd1 | sd2); None when it has none."""
    for style, prefix in COMPVIS_PREFIX.items():
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if style == "sd1":
            return transformers_to_openclip(part), style
        keep = {k: v for k, v in part.items() if k.startswith(("transformer.", "token_embedding", "positional",
                                                                "ln_final"))}
        return keep, style
    return None


# ---------------------------------------------------------------- configs


def tower_config(state: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, Any]:
    """What the weights of an OpenCLIP tower reveal. Head counts are not in them: CLIP's text towers use 64-wide
    heads (ViT-L: 12 of them, ViT-H: 16)."""
    width = int(state["token_embedding.weight"].shape[1])
    return {"width": width, "heads": heads or max(1, width // 64), "layers": num_layers_in(state),
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}


def identity_block(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A block that returns its input (zero output projections), appended for SD 2's penultimate-layer reading."""
    like = {k.split(".", 3)[3]: v for k, v in state.items() if k.startswith("transformer.resblocks.0.")}
    block = {}
    for name, value in like.items():
        fill = 1.0 if name.startswith(("ln_1.weight", "ln_2.weight")) else 0.0
        block[f"transformer.resblocks.{index}.{name}"] = torch.full_like(value, fill)
    return block


def from_transformers_config(cfg: dict[str, Any], pad_id: int) -> tuple[dict[str, Any], bool]:
    """A CLIPTextConfig (+ the tokenizer's pad id) -> our text_encoder kwargs, and whether the tower was cut at
    its penultimate block (OpenCLIP padding, i.e. SD 2 style)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"text_encoder/config.json: hidden_act={act!r}; OpenCLIP towers use gelu or quick_gelu")
    cut = pad_id == 0
    width = int(cfg["hidden_size"])
    return {"kind": "openclip", "model_name": None, "pretrained": None,
            "layer": "penultimate" if cut else "last", "width": width, "heads": int(cfg["num_attention_heads"]),
            "layers": int(cfg["num_hidden_layers"]) + cut, "context_length": int(cfg["max_position_embeddings"]),
            "mlp_ratio": int(cfg["intermediate_size"]) / width, "act": act, "pad_id": pad_id,
            "vocab_size": int(cfg.get("vocab_size", 49408))}, cut


def transformers_config(encoder: Any) -> dict[str, Any]:
    """Our OpenCLIP text tower -> CLIPTextConfig JSON; a penultimate-layer tower is written without its last block."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf_version = version("transformers")
    except PackageNotFoundError:
        tf_version = "4.40.0"
    width = encoder.output_dim
    layers = len(encoder.transformer.resblocks) - (encoder.layer == "penultimate")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "transformers_version": tf_version,
            "vocab_size": encoder.token_embedding.num_embeddings, "hidden_size": width,
            "intermediate_size": encoder.transformer.resblocks[0].mlp.c_fc.out_features,
            "projection_dim": width, "num_hidden_layers": layers,
            "num_attention_heads": encoder.transformer.resblocks[0].attn.num_heads,
            "max_position_embeddings": encoder.context_length, "hidden_act": encoder.act,
            "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
            "initializer_factor": 1.0, "pad_token_id": 1, "bos_token_id": SOT, "eos_token_id": EOT,
            "torch_dtype": "float32"}


# ---------------------------------------------------------------- files


def save_transformers(encoder: Any, directory: str | Path) -> Path:
    """A `text_encoder/` folder `transformers.CLIPTextModel.from_pretrained` loads (config.json + model.safetensors)."""
    directory = Path(directory)
    config = transformers_config(encoder)
    state = openclip_to_transformers(tower_state(encoder), config["num_hidden_layers"])
    save_safetensors(state, directory / WEIGHTS_NAME, {"format": "pt"})
    write_json(config, directory / CONFIG_NAME)
    return directory


def tower_state(encoder: Any) -> dict[str, torch.Tensor]:
    """The tower's tensors under their OpenCLIP names (our wrapper holds exactly those)."""
    return {k: v for k, v in encoder.state_dict().items() if k != "attn_mask"}


def load_transformers(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A `text_encoder/` folder (+ its sibling `tokenizer/`) -> our text_encoder kwargs and OpenCLIP weights."""
    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    weights = next((directory / n for n in (WEIGHTS_NAME, "pytorch_model.bin") if (directory / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    pad_id = tokenizer_pad_id(directory.parent / "tokenizer")
    kwargs, cut = from_transformers_config(cfg, pad_id)
    state = transformers_to_openclip(read_state_file(weights))
    if num_layers_in(state) != cfg["num_hidden_layers"]:
        raise ValueError(f"{weights}: {num_layers_in(state)} blocks, config.json says {cfg['num_hidden_layers']}")
    if cut:
        state.update(identity_block(state, cfg["num_hidden_layers"]))
    return kwargs, state


def tokenizer_pad_id(folder: Path) -> int:
    """The pad id a diffusers `tokenizer/` folder uses: end-of-text (SD 1) or 0, "!" (SD 2, OpenCLIP's)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                return 0 if pad == "!" else EOT
    return EOT


def save_tokenizer(directory: str | Path, context_length: int, pad_id: int) -> Path:
    """A CLIPTokenizer folder made from open_clip's bundled BPE vocabulary (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    directory = Path(directory)
    bpe = SimpleTokenizer(context_length=context_length)
    # open_clip spells the special tokens <start_of_text> / <end_of_text>; CLIP's tokenizer <|startoftext|> ...
    names = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}
    vocab = {names.get(int(i), token): int(i) for token, i in sorted(bpe.encoder.items(), key=lambda kv: kv[1])}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    pad = "!" if pad_id == 0 else "<|endoftext|>"
    if vocab.get(pad) != pad_id:
        raise ValueError(f"pad_id={pad_id}: only 0 ('!') or {EOT} (end of text) can be written as a CLIPTokenizer")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
              "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": True,
              "add_prefix_space": False}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "#version: 0.2\n" + "\n".join(merges)
             + "\n", "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
    for name, text in files.items():
        atomic_write(directory / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return directory
