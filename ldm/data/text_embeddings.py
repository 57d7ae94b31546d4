"""Frozen text-tower outputs stored with the latents, so stage=ldm never runs the tower in its training step.

`python -m ldm.data.latents ... --text-encoder tiny` writes, per sample, `{key}.context.npy`: the tower's
output for each of the sample's captions (N x T x D, float16, in caption order), and once, beside
latents.json, `empty_context.npy` (T x D): the empty prompt, for caption dropout and the unconditional
branch of model guidance. latents.json names the tower by `text_encoder_sha256`, a SHA-256 over its
weights and the settings that change its output (model, layer, context length, pad id, activation), and
keeps those settings under `text_encoder` so that a mismatch can name the key that differs.

This UNet's pooled vector (model.unet.pooled_context) is the token mean of the context it is given, so the
stored context serves it too; nothing else is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

CONTEXT_EXT = "context.npy"  # per sample: N captions x T tokens x D, float16
EMPTY_NAME = "empty_context.npy"  # beside latents.json: the empty prompt, T x D, float16
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf" / "model" / "text_encoder"


def load_tower_config(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A model.text_encoder config: a name in conf/model/text_encoder/ (tiny, openclip_vit_h14, ...) or a YAML
    file, then key=value overrides, exactly as `model/text_encoder=NAME model.text_encoder.KEY=VALUE` train."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"--text-encoder {name_or_path!r} is neither a YAML file nor one of {names}")
    config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides or [])))
    return OmegaConf.to_container(config, resolve=True)


def tower_settings(encoder: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """What besides the weights decides the tower's output; defaults filled from the built tower, so a config
    that leaves `layer` out equals one that says `layer: last`."""
    kind = config.get("kind", "openclip")
    if kind != "openclip":
        raise ValueError(f"stored text embeddings need an OpenCLIP text tower (model.text_encoder.kind=openclip), "
                         f"got kind={kind!r}")
    blocks = encoder.transformer.resblocks
    settings = {"kind": kind, "model_name": config.get("model_name"), "pretrained": config.get("pretrained"),
                "layer": encoder.layer, "context_length": encoder.context_length, "pad_id": encoder.pad_id,
                "act": encoder.act, "width": encoder.output_dim, "layers": len(blocks),
                "heads": blocks[0].attn.num_heads}
    if not settings["model_name"]:
        settings["seed"] = int(config.get("seed", 0))  # a random tower: its seed picks the weights
    return settings


def tower_digest(encoder: nn.Module, settings: dict[str, Any]) -> str:
    """SHA-256 over the settings and the weights: same tower, same digest."""
    return weights_digest(encoder, json.dumps(settings, sort_keys=True).encode())


def weights_digest(model: nn.Module, prefix: bytes = b"") -> str:
    """SHA-256 over `prefix` and the weights (names, shapes, float32 values): names latent shards' makers."""
    digest = hashlib.sha256(prefix)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def array_bytes(array: np.ndarray) -> bytes:
    """An .npy payload with no pickle in it."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_array(data: bytes) -> torch.Tensor:
    """An .npy payload -> tensor of its own dtype; numpy refuses pickled object arrays (allow_pickle=False)."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


class TextEmbedder:
    """Runs the frozen tower over captions in chunks and hands back float16 arrays, one per sample."""

    def __init__(self, config: dict[str, Any], device: str = "cpu", batch_size: int = 64) -> None:
        from ldm.conditioning import build_conditioner

        if config.get("freeze", True) is False:
            raise ValueError("--text-encoder: freeze=false; stored embeddings come from a frozen tower")
        self.config = dict(config)
        self.encoder = build_conditioner(self.config).to(device).eval()
        self.settings = tower_settings(self.encoder, self.config)
        self.sha256 = tower_digest(self.encoder, self.settings)
        self.batch_size = batch_size
        self.calls = 0  # captions embedded: one per caption (the tests check it)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> np.ndarray:
        """Captions -> len x T x D float16 (the tower runs in float32; rounded once, here)."""
        chunks = [self.encoder(captions[i:i + self.batch_size]).half().cpu()
                  for i in range(0, len(captions), self.batch_size)]
        self.calls += len(captions)
        return torch.cat(chunks).numpy()

    def per_sample(self, captions: list[list[str]]) -> list[np.ndarray]:
        """Every caption of every sample embedded once, in one pass; split back into N_i x T x D per sample."""
        flat = [c for sample in captions for c in sample]
        out = self.embed(flat) if flat else np.zeros((0, 0, 0), np.float16)
        bounds = np.cumsum([0, *(len(sample) for sample in captions)])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def info(self) -> dict[str, Any]:
        """What latents.json records about the tower."""
        return {"text_encoder": self.settings, "text_encoder_sha256": self.sha256, "context_member": CONTEXT_EXT,
                "empty_context": EMPTY_NAME}

    def write_empty(self, folder: Path) -> None:
        (Path(folder) / EMPTY_NAME).write_bytes(array_bytes(self.embed([""])[0]))


def has_text_embeddings(info: dict[str, Any]) -> bool:
    return bool(info.get("text_encoder_sha256"))


def load_empty_context(folder: str | Path) -> torch.Tensor:
    """The stored empty prompt's embedding (T x D float16) from a latent shard folder."""
    path = Path(folder) / EMPTY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the shards' empty-prompt embedding is missing")
    return load_array(path.read_bytes())


def tower_mismatch(info: dict[str, Any], encoder: nn.Module, config: dict[str, Any]) -> str | None:
    """Why this run's text tower cannot use the shards' stored embeddings (None: it can).

    The message starts with the key to change: model.text_encoder.<key>, or data.text_embeddings when only
    the weights differ."""
    if config.get("freeze", True) is False:
        return ("model.text_encoder.freeze=false: the shards hold a frozen tower's embeddings, which a trained "
                "tower would not reproduce; set data.text_embeddings=false to encode captions in the step")
    try:
        settings = tower_settings(encoder, config)
    except ValueError as err:
        return f"model.text_encoder.kind: {err}"
    stored = info["text_encoder"]
    for key in sorted(set(stored) | set(settings)):
        if stored.get(key) != settings.get(key):
            return (f"model.text_encoder.{key}={settings.get(key)!r}, but the shards' text embeddings were made with "
                    f"{key}={stored.get(key)!r}: use that tower, re-encode with python -m ldm.data.latents "
                    f"--text-encoder, or set data.text_embeddings=false")
    digest = tower_digest(encoder, settings)
    if digest != info["text_encoder_sha256"]:
        return (f"data.text_embeddings: the shards' text embeddings were made by another text tower's weights "
                f"(sha256 {info['text_encoder_sha256'][:12]}..., this run's {digest[:12]}...) with the same "
                f"settings; re-encode them or set data.text_embeddings=false")
    return None


def collate_context(contexts: list[torch.Tensor]) -> dict[str, Any]:
    """Per-sample N_i x T x D contexts -> {"context": B x T x D} when every sample has one caption, else
    {"context": B x N x T x D (zero-padded to the largest N), "caption_counts": [N_i]} (plain ints, so they stay
    on the host when Lightning moves the batch)."""
    counts = [int(c.shape[0]) for c in contexts]
    if all(n == 1 for n in counts):
        return {"context": torch.cat(contexts)}
    most = max(counts)
    out = contexts[0].new_zeros((len(contexts), most, *contexts[0].shape[1:]))
    for i, context in enumerate(contexts):
        out[i, : counts[i]] = context
    return {"context": out, "caption_counts": counts}


def attach_stored_text(module: Any, datamodule: Any) -> bool:
    """Before fit: when the datamodule reads stored embeddings, check that the module's tower made them (else
    ValueError naming the key) and hand the module the stored empty prompt. False: the step encodes text."""
    if not getattr(datamodule, "text_embeddings", False):
        return False
    why = tower_mismatch(datamodule.text_embeddings_info, module.text_encoder, dict(module.hparams.text_encoder))
    if why is not None:
        raise ValueError(why)
    module.use_stored_text(datamodule.empty_context)
    return True
