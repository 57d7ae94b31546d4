"""Several captions per sample: where they are read from, and which one a training step uses.

A sample's captions are its text members in `data.caption_key` order (one key, or a list such as
[txt, txt2]), then the strings under `data.caption_json_key` in its .json (a list, or one string); empty
and repeated ones are dropped. The data side keeps them all (batch["captions"], and with stored
embeddings one context per caption); the module picks one per sample and step, from (seed, step, rank)
alone, so a resumed run picks what an uninterrupted one would have picked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import torch


def caption_keys(caption_key: str | Sequence[str]) -> tuple[str, ...]:
    """data.caption_key as a tuple of lower-case member extensions (one key or a list)."""
    keys = (caption_key,) if isinstance(caption_key, str) else tuple(caption_key)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"data.caption_key must name tar member extensions, e.g. txt or [txt, txt2], "
                         f"got {caption_key!r}")
    return tuple(k.lower() for k in keys)


def _text(raw: bytes, stats: dict[str, int]) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        stats["bad_caption"] += 1
        return raw.decode("utf-8", errors="replace").strip()


def _json_captions(raw: bytes | None, json_key: str, stats: dict[str, int]) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw).get(json_key)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        stats["bad_caption"] += 1
        return []
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    if value is not None:
        stats["bad_caption"] += 1
    return []


def read_captions(fields: dict[str, Any], keys: Sequence[str], json_key: str | None,
                  stats: dict[str, int]) -> list[str]:
    """Every caption of one raw sample (fields keyed by lower-case extension); [""] when it has none."""
    found = [_text(fields[k], stats) for k in keys if fields.get(k) is not None]
    if json_key:
        found += _json_captions(fields.get("json"), json_key, stats)
    captions = list(dict.fromkeys(c for c in found if c))  # order kept, empties and repeats dropped
    if not captions:
        stats["no_caption"] += 1
        return [""]
    return captions


def pick_indices(counts: Sequence[int], seed: int, step: int, rank: int) -> list[int]:
    """One caption index per sample, a function of (seed, step, rank) and the counts alone."""
    rng = random.Random(f"captions:{seed}:{step}:{rank}")
    return [rng.randrange(n) if n > 1 else 0 for n in counts]


def pick_captions(batch: dict[str, Any], seed: int, step: int, rank: int
                  ) -> tuple[list[str], torch.Tensor | None]:
    """This step's caption per sample, and its stored context (B x T x D float) when the batch has one.

    With several captions the batch has "captions" (lists) and/or a 4-D "context" (B x N x T x D, padded, with
    "caption_counts", a list of ints); one index per sample picks both the text and its embedding."""
    context = batch.get("context")
    if "captions" in batch:
        counts = [len(c) for c in batch["captions"]]
    elif context is not None and context.ndim == 4:
        counts = list(batch["caption_counts"])  # plain ints: Lightning leaves them on the host
    else:
        return list(batch["caption"]), None if context is None else context.float()
    index = pick_indices(counts, seed, step, rank)
    captions = [c[i] for c, i in zip(batch["captions"], index, strict=True)] if "captions" in batch else list(
        batch["caption"])
    if context is not None:
        if context.ndim == 4:
            rows = torch.arange(context.shape[0])
            context = context[rows.to(context.device), torch.tensor(index).to(context.device)]
        context = context.float()
    return captions, context
