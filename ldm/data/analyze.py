"""Read the caption back out of a "shapes" image by pixel statistics.

This is the yardstick for text conditioning on the synthetic data set: a
sample generated for "a red circle on a blue background" is scored by whether
its pixels show a red circle on a blue background. It is built to tolerate what
diffusion samples look like: noise, soft edges and slightly wrong colours.

    background: nearest palette colour to the median border pixel
    shape mask: pixels far from the background, the largest connected blob,
                then re-cut halfway between background and shape colour
    colour:     nearest palette colour (other than the background) to the median
                of the interior pixels farthest from the background
    shape:      triangle if the mask is much narrower at the top than at the
                bottom, else the best intersection-over-union with an ideal
                circle, square and upright triangle fitted to its bounding box
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import COLORS, PALETTE, SHAPES, parse_caption

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)

# Pixels farther than this (RGB distance, 0-255 scale) from the background seed the shape mask.
# The closest palette pair (yellow/orange) is ~81 apart, so 40 keeps every shape and rejects
# noise of several grey levels.
SEED_THRESHOLD = 40.0


def to_numpy_rgb(image: Any) -> np.ndarray:
    """Accept a uint8 HxWx3 array, a PIL image or a 3xHxW tensor in [-1, 1]; return float HxWx3 in 0-255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW tensor, got shape {tuple(image.shape)}")
        array = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
        return np.clip((array + 1.0) * 127.5, 0.0, 255.0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array (0-255), got dtype {array.dtype}")
    return array.astype(np.float64)


def _nearest_color(rgb: np.ndarray, exclude: str | None = None) -> str:
    """Palette name nearest to `rgb`, optionally never `exclude`."""
    dist = np.linalg.norm(_PALETTE_RGB - rgb, axis=1)
    if exclude is not None:
        dist[COLORS.index(exclude)] = np.inf
    return COLORS[int(np.argmin(dist))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of `mask`, to drop speckles and stray pixels.

    Labels start as pixel indices; each pixel repeatedly takes the smallest label in
    its 3x3 neighbourhood, then the label of that label (pointer jumping, so few
    rounds), until every blob carries its own minimum index.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask.copy()
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    height, width = crop.shape
    big = crop.size
    labels = np.where(crop, np.arange(crop.size).reshape(crop.shape), big)
    padded = np.full((height + 2, width + 2), big)
    while True:
        padded[1:-1, 1:-1] = labels
        rows = np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])
        smallest = np.minimum(np.minimum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
        updated = np.where(crop, smallest, big)
        updated[crop] = np.append(updated.ravel(), big)[updated[crop]]  # jump to the label's label
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[crop], return_counts=True)
    out = np.zeros_like(mask)
    out[y0 : y0 + height, x0 : x0 + width] = labels == values[np.argmax(counts)]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in `mask` (the blob's interior, away from soft edges)."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal masks of each shape filling a height x width box, sampled at pixel centres."""
    v = (np.arange(height) + 0.5)[:, None] / height  # 0 at the top edge, 1 at the bottom edge
    u = (np.arange(width) + 0.5)[None, :] / width
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= 0.5 * v,  # apex at the top, base along the bottom
    }


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each ideal shape fitted to its bounding box (useful for debugging)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return dict.fromkeys(SHAPES, 0.0)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scores = {}
    for name, template in _templates(*crop.shape).items():
        union = np.logical_or(crop, template).sum()
        scores[name] = float(np.logical_and(crop, template).sum() / union)
    return scores


def _top_bottom_ratio(mask: np.ndarray) -> float:
    """Mean row width of the top third over the bottom third: ~0.2 for an upright triangle, ~1 otherwise."""
    ys, xs = np.nonzero(mask)
    widths = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].sum(axis=1).astype(np.float64)
    third = max(1, len(widths) // 3)
    return float(widths[:third].mean() / max(widths[-third:].mean(), 1.0))


# A mask much narrower at the top than at the bottom is a triangle even when blur has eaten its apex
# (which spoils the template fit); circles and squares stay near 1 under blur and noise.
TRIANGLE_RATIO = 0.6


def _classify_shape(mask: np.ndarray) -> str:
    """Shape name from the mask's geometry: the width profile first, then the best template fit."""
    if _top_bottom_ratio(mask) < TRIANGLE_RATIO:
        return "triangle"
    scores = shape_scores(mask)
    return max(SHAPES, key=lambda name: scores[name])


def analyze_image(image: Any) -> dict[str, str]:
    """Recover {"background", "color", "shape"} from an image of the shapes data set."""
    rgb = to_numpy_rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)

    # Seed: clearly-not-background pixels, largest blob. Its interior gives the shape colour.
    distance = np.linalg.norm(rgb - bg_rgb, axis=2)
    seed = _largest_component(distance > SEED_THRESHOLD)
    if not seed.any():  # nothing drawn: any answer is a guess; take the most different pixel
        far = np.unravel_index(np.argmax(distance), distance.shape)
        return {
            "background": background,
            "color": _nearest_color(rgb[far], exclude=background),
            "shape": "square",
        }
    core = _erode(seed)
    inner = core if core.sum() >= 4 else seed
    # Blur mixes background into small shapes; their purest pixels are the ones farthest from it.
    inner = inner & (distance >= np.median(distance[inner]))
    shape_rgb = np.median(rgb[inner], axis=0)
    color = _nearest_color(shape_rgb, exclude=background)

    # Re-cut the mask halfway between the two colours so blurred edges split evenly.
    direction = shape_rgb - bg_rgb
    t = (rgb - bg_rgb) @ direction / max(float(direction @ direction), 1e-6)
    mask = _largest_component(t > 0.5)
    if mask.sum() < seed.sum() / 2:  # the re-cut fell apart (odd colours): keep the seed
        mask = seed
    shape = _classify_shape(mask)
    return {"background": background, "color": color, "shape": shape}


def prompt_accuracy(images: torch.Tensor | Sequence[Any], captions: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose colour, background, shape (and all three) match their caption.

    `images` is a Bx3xHxW tensor in [-1, 1] or a list of anything `analyze_image` takes.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a Bx3xHxW tensor, got shape {tuple(images.shape)}")
        images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("prompt_accuracy needs at least one image")
    hits = {"color": 0, "background": 0, "shape": 0, "all": 0}
    for image, caption in zip(images, captions, strict=True):
        want = parse_caption(caption)
        got = analyze_image(image)
        matches = [got[key] == want[key] for key in ("color", "background", "shape")]
        for key, ok in zip(("color", "background", "shape"), matches, strict=True):
            hits[key] += ok
        hits["all"] += all(matches)
    return {key: value / len(images) for key, value in hits.items()}
