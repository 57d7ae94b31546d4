"""Conditioners: OpenCLIP text (default), learned class embeddings, or none."""

from __future__ import annotations

from typing import Any

from torch import nn

from ldm.conditioning.class_embedding import ClassEmbedder, Unconditional
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

CONDITIONING_KINDS = ("openclip", "class", "none")


def build_conditioner(config: dict[str, Any]) -> nn.Module:
    """`model.text_encoder` config -> module; `kind` picks the family (openclip when absent)."""
    kwargs = dict(config)
    kind = kwargs.pop("kind", "openclip")
    if kind == "openclip":
        return OpenCLIPTextEncoder(**kwargs)
    if kind == "class":
        return ClassEmbedder(**kwargs)
    if kind == "none":
        kwargs.pop("freeze", None)  # nothing to train or freeze (a recipe may set it for every conditioner)
        if kwargs:
            raise ValueError(f"model.text_encoder kind=none takes no other keys, got {sorted(kwargs)}")
        return Unconditional()
    raise ValueError(f"model.text_encoder.kind={kind!r}: choose one of {CONDITIONING_KINDS}")


def rebuilt_from_name(config: dict[str, Any]) -> bool:
    """A frozen published OpenCLIP tower (model_name + pretrained): building the conditioner from its config
    reloads the same weights, so checkpoints and exports need not store them again (1-2 GB at SD sizes)."""
    return (config.get("kind", "openclip") == "openclip" and bool(config.get("model_name"))
            and bool(config.get("pretrained")) and config.get("freeze", True) is not False)
