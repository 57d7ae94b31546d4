"""Raw tar samples -> (image tensor, caption), with PIL and UTF-8 only, and counts of what went wrong.

Every image mode a web crawl produces is turned into RGB: transparency is
composited on a configurable background (a transparent logo on black would
otherwise turn into a black square), palette, grey, CMYK and 16-bit images are
converted with their full range. Payloads other than the image, the caption
and (when a size filter needs it) the json metadata are never read.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.captions import caption_keys, read_captions
from ldm.data.shards import IMAGE_EXTENSIONS, Sample
from ldm.data.text_embeddings import CONTEXT_EXT, load_array

MOMENTS_EXT = "moments.npy"  # precomputed latents (ldm.data.latents): posterior mean and log-variance

# Counted per DataLoader worker and passed along with every batch (see `collate`).
STAT_KEYS = ("samples", "skipped", "no_caption", "bad_caption", "filtered", "padded", "failed_shards",
             "dropped")  # dropped: left in partial aspect buckets at the end of a finite part


class Filtered(Exception):
    """A sample that decodes but is excluded on purpose (e.g. smaller than `min_size`)."""


@dataclass(frozen=True)
class DecodeOptions:
    """How a sample becomes a training example; one object per stream, picklable into workers."""

    resolution: int
    caption_key: str | tuple[str, ...] = "txt"  # one member extension, or several (each a caption)
    crop: str = "center"  # center | random
    flip_p: float = 0.0  # probability of a horizontal flip
    background: tuple[int, int, int] = (255, 255, 255)  # behind transparent pixels
    min_size: int = 0  # shorter side of the original image, in pixels; smaller samples are filtered
    latents: bool = False  # read precomputed moments (`{key}.moments.npy`) instead of an image
    caption_json_key: str | None = None  # also read captions from this key of the sample's .json (a list)
    text_embeddings: bool = False  # with latents: read the stored context (`{key}.context.npy`) too
    bucketed: bool = False  # aspect buckets: read the json too (its width/height place a sample cheaply)

    def __post_init__(self) -> None:
        object.__setattr__(self, "caption_key", caption_keys(self.caption_key))
        if self.text_embeddings and not self.latents:
            raise ValueError("data.text_embeddings=true needs data.latents=true (shards from python -m "
                             "ldm.data.latents --text-encoder)")
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"data.flip_p must be in [0, 1], got {self.flip_p!r}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"data.background must be three values in 0..255, got {self.background!r}")

    def keeps(self) -> Callable[[str], bool]:
        """The member filter: which extensions are read out of a shard at all."""
        wanted = {*IMAGE_EXTENSIONS, *self.caption_key}
        if self.latents:
            wanted.add(MOMENTS_EXT)
        if self.text_embeddings:
            wanted.add(CONTEXT_EXT)
        if self.min_size > 0 or self.caption_json_key or self.bucketed:
            wanted.add("json")
        return frozenset(wanted).__contains__

    @property
    def several_captions(self) -> bool:
        """Samples may carry more than one caption: batches then hold them all under "captions"."""
        return len(self.caption_key) > 1 or bool(self.caption_json_key)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """I;16 / I / F grey images -> 8-bit L with the full range kept (PIL's convert would clip)."""
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or array.max(initial=0.0) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8: mode L


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on `background`."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _sixteen_bit_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image if image.mode == "RGB" else image.convert("RGB")


def _original_size(fields: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) of the image before img2dataset resized it, from the json, if recorded."""
    raw = fields.get("json")
    if not raw:
        return None
    meta = json.loads(raw)
    for w, h in (("original_width", "original_height"), ("width", "height")):
        if isinstance(meta.get(w), (int, float)) and isinstance(meta.get(h), (int, float)):
            return int(meta[w]), int(meta[h])
    return None


def _cover_crop(
    image: Image.Image, height: int, width: int, options: DecodeOptions, rng: random.Random | None
) -> tuple[Image.Image, int, int]:
    """Resize to cover height x width (aspect kept), crop centre or random; returns (image, top, left)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image, 0, 0
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if options.crop == "random" and rng is not None:
        left, top = rng.randint(0, size[0] - width), rng.randint(0, size[1] - height)
    else:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height)), top, left


def load_image_sized(
    data: bytes,
    options: DecodeOptions,
    size: tuple[int, int],
    rng: random.Random | None = None,
    check_size: bool = True,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Encoded image -> (3xHxW tensor in [-1, 1], (top, left) of the crop, (height, width) as stored).

    `size` is (height, width); the image is resized to cover it, cropped and maybe flipped.
    """
    height, width = size
    with Image.open(io.BytesIO(data)) as opened:  # everything inside: closing drops the pixels
        if check_size and options.min_size and min(opened.size) < options.min_size:
            raise Filtered(f"image {opened.size} smaller than min_size {options.min_size}")
        stored = (opened.size[1], opened.size[0])
        opened.draft("RGB", (width, height))  # JPEG: decode at a reduced scale when much larger
        image, top, left = _cover_crop(to_rgb(opened, options.background), height, width, options, rng)
        if options.flip_p > 0 and rng is not None and rng.random() < options.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.array(image, dtype=np.uint8))
    if image.size != (width, height):  # draft scaled a JPEG below the target: cannot happen, but be loud
        raise ValueError(f"decoded image is {image.size}, wanted {(width, height)}")
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0), (top, left), stored


def load_image(
    data: bytes, options: DecodeOptions, rng: random.Random | None = None, check_size: bool = True
) -> torch.Tensor:
    """Encoded image -> 3xRxR float tensor in [-1, 1]: RGB, shorter side resized to R, cropped, maybe flipped.

    `check_size=False` skips the min_size test on the decoded image (the caller knew the original size).
    """
    resolution = options.resolution
    return load_image_sized(data, options, (resolution, resolution), rng, check_size)[0]


def load_moments(data: bytes) -> torch.Tensor:
    """An .npy payload -> float32 tensor; numpy refuses object arrays (pickles) with allow_pickle=False."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def decode_sample(
    sample: Sample,
    options: DecodeOptions,
    stats: dict[str, int],
    rng: random.Random | None = None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Raw sample (bytes per extension) -> {"image", "caption", "key"}; raises when it cannot be used.

    With `size` (an aspect bucket's (height, width)) the image is cropped to it and the
    example also carries "crop_top_left" (top, left in the resized image) and
    "original_size" (height, width before any resize: the json's original_*, else as stored).

    A missing caption becomes "" and a caption that is not UTF-8 is decoded with
    replacement characters; both are counted in `stats`.
    """
    fields = {key.lower(): value for key, value in sample.items()}
    if options.latents:
        if MOMENTS_EXT not in fields:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {MOMENTS_EXT}")
        return {"moments": load_moments(fields[MOMENTS_EXT]), **_caption(fields, options, stats),
                "key": sample.get("__key__", "")}
    data = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    target = size
    original = _original_size(fields) if options.min_size or target is not None else None
    if original is not None and options.min_size and min(original) < options.min_size:
        raise Filtered(f"original size {original} smaller than min_size {options.min_size}")
    check = original is None  # img2dataset may have resized it: trust the json's original size
    if target is None:
        image = load_image(data, options, rng, check_size=check)
        return {"image": image, **_caption(fields, options, stats), "key": sample.get("__key__", "")}
    image, crop, stored = load_image_sized(data, options, target, rng, check_size=check)
    height, width = (original[1], original[0]) if original is not None else stored
    return {"image": image, **_caption(fields, options, stats), "key": sample.get("__key__", ""),
            "crop_top_left": torch.tensor(crop, dtype=torch.long),
            "original_size": torch.tensor((height, width), dtype=torch.long)}


def _caption(fields: dict[str, Any], options: DecodeOptions, stats: dict[str, int]) -> dict[str, Any]:
    """{"caption": the first} and, as configured, {"captions": all} and {"context": N x T x D float16}."""
    captions = read_captions(fields, options.caption_key, options.caption_json_key, stats)
    out: dict[str, Any] = {"caption": captions[0]}
    if options.several_captions:
        out["captions"] = captions
    if options.text_embeddings:
        if CONTEXT_EXT not in fields:
            raise ValueError(f"sample {fields.get('__key__')} has no {CONTEXT_EXT} (stored text embeddings)")
        context = load_array(fields[CONTEXT_EXT])
        if context.ndim != 3 or (options.several_captions and context.shape[0] != len(captions)):
            raise ValueError(f"sample {fields.get('__key__')}: {CONTEXT_EXT} of shape {tuple(context.shape)} "
                             f"does not hold one T x D context per caption ({len(captions)})")
        out["context"] = context
    return out
