"""Read the caption back out of a "shapes" image by pixel statistics.

This is the yardstick for text conditioning on the synthetic data set: a
sample generated for "a red circle on a blue background" is scored by whether
its pixels show a red circle on a blue background. It should agree with a
person looking at the picture: it tolerates what diffusion samples look like
(noise, mild blur, soft edges, slightly wrong colours) but answers "other",
which never matches a caption, for anything a person would not call by the
caption's words.

    background: the colour that dominates the one-pixel border ring (a shape covers
                at most ~a quarter of it); "other" if no colour holds BACKGROUND_SHARE
                of the ring (split or strongly graded backgrounds) or it is not near a
                palette colour
    shape mask: pixels far from the background, 8-connected; blobs that span most of
                an image side are background, not objects; the largest object seeds
                the mask, which is re-cut halfway between background and shape colour
    colour:     median of the object's purest interior pixels; its nearest palette
                colour if within COLOR_TOLERANCE_FRAC of that colour's distance to its
                own nearest palette neighbour (so a halfway mix of two palette colours is
                "other"), and "other" too if a sizeable part of the object is a third
                colour (not a blend of background and shape colour)
    shape:      "other" for no object, a second object at least SECOND_OBJECT_FRAC of the
                first, a box under MIN_SIDE px or far from square (MIN_ASPECT: a 2:1
                ellipse), or a concave mask, judged against the convex hull of its pixel
                centres (single-pixel noise holes filled): unfilled hull pixels cost
                solidity (MIN_SOLIDITY: cups, crescents) and the deepest one must stay
                within MAX_NOTCH of the side (a notch in a square). Otherwise the ideal
                circle, square or upright triangle fitted to the bounding box with the
                best intersection-over-union, if that IoU reaches the shape's own MIN_IOU
                (a diamond or two merged circles are no circle); a square may also fit
                a rectangle tilted up to MAX_TILT_DEG, a circle's outline must keep a
                near-constant distance from its centre (MAX_RADIAL_CV: no tilted squares
                or rounded diamonds); a mask much narrower at the top than at the bottom
                (TRIANGLE_RATIO) can only be a triangle, any other only a circle or square

`confusion` tallies what was asked against what was read, per attribute, so a
report can say which attributes and colours still fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import COLORS, PALETTE, SHAPES, parse_caption

OTHER = "other"
ATTRIBUTES = ("color", "background", "shape")

# {attribute: {wanted: {got: count}}}
Confusion = dict[str, dict[str, dict[str, int]]]

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)

# Pixels farther than this (RGB distance, 0-255 scale) from the background seed the shape mask.
# The closest palette pair (yellow/orange) is ~81 apart, so 40 keeps every shape and rejects
# noise of several grey levels.
SEED_THRESHOLD = 40.0

# A colour counts as a palette colour within this fraction of the distance from that palette colour
# to its nearest neighbour: below 0.5, so a halfway mix of two palette colours is never accepted,
# while 40% of the way (yellow/orange: 32 of 81) is still "slightly off". Capped for the far-apart
# colours, so mid greys are neither white nor black.
COLOR_TOLERANCE_FRAC = 0.4
COLOR_TOLERANCE_CAP = 60.0


def _palette_tolerances() -> np.ndarray:
    """Per palette colour: the largest RGB distance still called by its name."""
    spacing = np.linalg.norm(_PALETTE_RGB[:, None] - _PALETTE_RGB[None], axis=2)
    np.fill_diagonal(spacing, np.inf)
    return np.minimum(COLOR_TOLERANCE_FRAC * spacing.min(axis=1), COLOR_TOLERANCE_CAP)


_TOLERANCE = _palette_tolerances()

# The dominant border colour must cover this share of the one-pixel border ring. A data-set shape in
# a corner covers at most 2 x 45% of two sides (~23% of the ring); a background split in two halves
# leaves ~50%, a gradient spanning more than ~60 RGB units across the image less than 70%.
BACKGROUND_SHARE = 0.7

# A connected blob covering more than this fraction of an image side is background, not an object:
# the data set's shapes span at most 45% of the side.
BACKGROUND_SPAN = 0.6

# A second object at least this fraction of the first one's area makes the picture "two shapes".
SECOND_OBJECT_FRAC = 0.25

# Of the object's pixels, more than this fraction far off the background-to-shape colour line
# (a third colour, not blur) makes its colour "other".
MAX_OFF_COLOR_FRAC = 0.2

# Geometry thresholds, calibrated on renders at 32 and 64 px (clean; noise 0.05 with blur 0.7 px per
# 32 px; bicubic 48 -> 32 px) against the hand-picked failures in tests/test_analyze.py.
# Bounding box short side / long side: true shapes >= 0.88 (blur eats apexes), a 2:1 ellipse 0.5.
MIN_ASPECT = 0.8
# Mask pixels / pixels in the convex hull of their centres: 1 clean, >= 0.95 noisy, a cup 0.6.
MIN_SOLIDITY = 0.9
# A hull pixel left unfilled deeper than this fraction of the side (and 1.5 px) is a notch: noise and
# blur reach 0.05 (1 px); a notch a quarter of the side deep reaches 0.15.
MAX_NOTCH = 0.1
MIN_NOTCH_PX = 1.5
# IoU with the ideal fitted to the bounding box. True shapes score at least: circle 0.86, square 0.87,
# triangle 0.79 (blur 1 px at 32 px); a diamond scores 0.64-0.72 as a circle, two merged circles 0.68.
MIN_IOU = {"circle": 0.82, "square": 0.85, "triangle": 0.75}
# Below 8 px (the smallest shape at 32 px) PIL's own circles are octagons (IoU 0.75 at 6 px): so are
# diamonds that small, but 7-px diamonds still score 0.68.
COARSE_SIDE = 8
MIN_IOU_COARSE_CIRCLE = 0.75
# A circle's outline-to-centroid distance varies by at most this fraction plus pixelation (px):
# true circles stay below, squares (tilted too) and diamonds (std ~0.11 of the mean) above.
MAX_RADIAL_CV = 0.06
RADIAL_PIXEL_SLACK = 0.25
# A mask much narrower at the top than at the bottom is a triangle even when blur has eaten its apex;
# circles and squares stay near 1 under blur and noise.
TRIANGLE_RATIO = 0.6
APEX_SLACK = 0.25
# A square may be rotated this much (degrees) and still be a square; a diamond is rotated 45.
MAX_TILT_DEG = 15.0
# Smaller masks (bounding-box side in pixels) are too coarse to tell shapes apart.
MIN_SIDE = 4


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


def palette_name(rgb: np.ndarray, exclude: str | None = None) -> str:
    """Palette name of `rgb` if it is close enough to one (never `exclude`), else "other"."""
    dist = np.linalg.norm(_PALETTE_RGB - rgb, axis=1)
    if exclude in COLORS:
        dist[COLORS.index(exclude)] = np.inf
    best = int(np.argmin(dist))
    return COLORS[best] if dist[best] <= _TOLERANCE[best] else OTHER


def _labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of `mask` (-1 outside it); each blob carries its smallest pixel index.

    Labels start as pixel indices; each pixel repeatedly takes the smallest label in
    its 3x3 neighbourhood, then the label of that label (pointer jumping, so few
    rounds), until every blob carries its own minimum index.
    """
    if not mask.any():
        return np.full(mask.shape, -1)
    height, width = mask.shape
    big = mask.size
    labels = np.where(mask, np.arange(big).reshape(mask.shape), big)
    padded = np.full((height + 2, width + 2), big)
    while True:
        padded[1:-1, 1:-1] = labels
        rows = np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])
        smallest = np.minimum(np.minimum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
        updated = np.where(mask, smallest, big)
        updated[mask] = np.append(updated.ravel(), big)[updated[mask]]  # jump to the label's label
        if np.array_equal(updated, labels):
            break
        labels = updated
    return np.where(mask, labels, -1)


def _objects(mask: np.ndarray) -> list[np.ndarray]:
    """Connected blobs of `mask` that could be a drawn shape, largest first.

    Blobs spanning more than BACKGROUND_SPAN of an image side are left out: they are part
    of the background (a second background colour), not something drawn on it.
    """
    labels = _labels(mask)
    values, counts = np.unique(labels[mask], return_counts=True)
    out = []
    for value in values[np.argsort(-counts, kind="stable")]:
        blob = labels == value
        ys, xs = np.nonzero(blob)
        span = np.array([ys.max() - ys.min() + 1, xs.max() - xs.min() + 1])
        if (span <= BACKGROUND_SPAN * np.array(mask.shape)).all():
            out.append(blob)
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in `mask` (the blob's interior, away from soft edges)."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _fill_pinholes(mask: np.ndarray) -> np.ndarray:
    """The mask with single-pixel holes filled: noise makes them, nobody sees them as notches."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask | (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _crop(mask: np.ndarray) -> np.ndarray:
    """The mask cut to its bounding box."""
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal masks of each shape filling a height x width box, sampled at pixel centres."""
    v = (np.arange(height) + 0.5)[:, None] / height  # 0 at the top edge, 1 at the bottom edge
    u = (np.arange(width) + 0.5)[None, :] / width
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= 0.5 * v,  # apex at the top, base along the bottom
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two equal-shaped masks."""
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each ideal shape fitted to its bounding box.

    The triangle may also have its apex up to APEX_SLACK of its height above the box:
    blur thins the apex below the cut, which leaves a truncated but plainly triangular mask.
    """
    if not mask.any():
        return dict.fromkeys(SHAPES, 0.0)
    crop = _crop(mask)
    height, width = crop.shape
    scores = {name: _iou(crop, template) for name, template in _templates(height, width).items()}
    scores["square"] = max(scores["square"], tilted_square_iou(mask))
    for extra in range(1, int(APEX_SLACK * height) + 1):
        taller = _templates(height + extra, width)["triangle"][extra:]
        scores["triangle"] = max(scores["triangle"], _iou(crop, taller))
    return scores


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Corners of the convex hull of integer (x, y) points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64)

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in seq:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _hull_of(crop: np.ndarray) -> np.ndarray:
    """Convex hull (x, y) of a cropped mask's pixel centres; each row's two ends suffice."""
    rows = np.nonzero(crop.any(axis=1))[0]
    left = np.array([np.argmax(crop[r]) for r in rows])
    right = np.array([crop.shape[1] - 1 - np.argmax(crop[r][::-1]) for r in rows])
    return _convex_hull(np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]))


def tilted_square_iou(mask: np.ndarray) -> float:
    """IoU with the smallest rectangle around the mask, if tilted at most MAX_TILT_DEG and near-square.

    A person still calls a slightly rotated square a square, though it fills its upright
    bounding box badly; a diamond is that square at 45 degrees and does not qualify.
    The rectangle is the minimum-area one, which has a side along a hull edge.
    """
    crop = np.pad(_crop(mask), 2)
    hull = _hull_of(crop)
    if len(hull) < 3:
        return 0.0
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for (ax, ay), (bx, by) in zip(hull, np.roll(hull, -1, axis=0), strict=True):
        angle = (np.degrees(np.arctan2(by - ay, bx - ax)) + 45.0) % 90.0 - 45.0  # in [-45, 45)
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        u, v = hull[:, 0] * c + hull[:, 1] * s, hull[:, 1] * c - hull[:, 0] * s
        lo, hi = np.array([u.min(), v.min()]) - 0.5, np.array([u.max(), v.max()]) + 0.5  # pixel extent
        area = float(np.prod(hi - lo))
        if best is None or area < best[0]:
            best = (area, angle, lo, hi)
    _, angle, lo, hi = best
    sides = hi - lo
    if abs(angle) > MAX_TILT_DEG or sides.min() / sides.max() < MIN_ASPECT:
        return 0.0
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    ys, xs = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]]
    u, v = xs * c + ys * s, ys * c - xs * s
    rect = (u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1])
    return _iou(crop, rect)


def concavity(mask: np.ndarray) -> tuple[float, float]:
    """(solidity, notch depth) of a mask, against the convex hull of its pixel centres.

    Solidity is mask pixels over pixels whose centres lie in that hull: exactly 1 for any
    digitally convex shape (a rendered circle, square or triangle at any size), so pixel
    staircases cost nothing, while a notch, a cup, a crescent or the waist between two
    merged blobs leaves hull pixels unfilled. Notch depth is how far (pixels) the deepest
    unfilled one lies inside the hull: a small but deep bite out of a square has it high
    while its solidity stays near 1; noise along an edge only reaches about a pixel.
    """
    crop = _crop(mask)
    hull = _hull_of(crop)
    if len(hull) < 3:
        return 1.0, 0.0
    ys, xs = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]]
    depth = np.full(crop.shape, np.inf)
    for (ax, ay), (bx, by) in zip(hull, np.roll(hull, -1, axis=0), strict=True):
        edge = np.hypot(bx - ax, by - ay)
        depth = np.minimum(depth, ((bx - ax) * (ys - ay) - (by - ay) * (xs - ax)) / edge)
    inside = depth >= -1e-9
    defect = inside & ~crop
    notch = float(depth[defect].max()) if defect.any() else 0.0
    return float(crop.sum() / max((inside | crop).sum(), 1)), notch


def _top_bottom_ratio(mask: np.ndarray) -> float:
    """Mean row width of the top third over the bottom third: ~0.2 for an upright triangle, ~1 otherwise."""
    widths = _crop(mask).sum(axis=1).astype(np.float64)
    third = max(1, len(widths) // 3)
    return float(widths[:third].mean() / max(widths[-third:].mean(), 1.0))


def radial_spread(mask: np.ndarray) -> tuple[float, float]:
    """(std, mean) of the outline pixels' distances from the mask's centroid, in pixels.

    A circle's outline is equally far from its centre all round (up to pixelation, ~0.3 px);
    any square, tilted or not, and a diamond swing between half the side and half the
    diagonal (std/mean ~0.11), however well they overlap a circle's template.
    """
    ys, xs = np.nonzero(mask)
    outline_y, outline_x = np.nonzero(mask & ~_erode(mask))
    radius = np.hypot(outline_y - ys.mean(), outline_x - xs.mean())
    return float(radius.std()), float(radius.mean())


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """The numbers `classify_shape` decides on (for debugging and calibration)."""
    height, width = _crop(mask).shape
    return {
        "side": float(min(height, width)),
        "aspect": min(height, width) / max(height, width),
        **dict(zip(("solidity", "notch"), concavity(mask), strict=True)),
        **dict(zip(("radial_std", "radial_mean"), radial_spread(mask), strict=True)),
        "top_bottom": _top_bottom_ratio(mask),
        **{f"iou_{name}": value for name, value in shape_scores(mask).items()},
    }


def classify_shape(mask: np.ndarray) -> str:
    """Circle, square or triangle only if the mask fits that ideal well, else "other"."""
    if not mask.any():
        return OTHER
    f = shape_features(_fill_pinholes(mask))
    if f["side"] < MIN_SIDE or f["aspect"] < MIN_ASPECT or f["solidity"] < MIN_SOLIDITY:
        return OTHER
    if f["notch"] > max(MIN_NOTCH_PX, MAX_NOTCH * f["side"]):
        return OTHER
    need = dict(MIN_IOU)
    if f["side"] < COARSE_SIDE:
        need["circle"] = MIN_IOU_COARSE_CIRCLE
    fits = [name for name in SHAPES if f[f"iou_{name}"] >= need[name]]
    if f["radial_std"] > MAX_RADIAL_CV * f["radial_mean"] + RADIAL_PIXEL_SLACK and "circle" in fits:
        fits.remove("circle")  # corners: a tilted square or a rounded diamond, not a circle
    if f["top_bottom"] < TRIANGLE_RATIO:  # narrow top: a triangle or nothing
        fits = [name for name in fits if name == "triangle"]
    elif "triangle" in fits:
        fits.remove("triangle")
    return max(fits, key=lambda name: f[f"iou_{name}"], default=OTHER)


def _background(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Colour of the border ring's dominant cluster, and the share of the ring it covers."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    if len(border) > 512:  # big images: an even subsample of the ring is plenty
        border = border[np.linspace(0, len(border) - 1, 512).astype(int)]
    sq = (border**2).sum(axis=1)
    close = sq[:, None] + sq[None] - 2.0 * border @ border.T < SEED_THRESHOLD**2
    members = close[int(np.argmax(close.sum(axis=1)))]
    bg_rgb = np.median(border[members], axis=0)
    share = float((np.linalg.norm(border - bg_rgb, axis=1) < SEED_THRESHOLD).mean())
    return bg_rgb, share


def analyze_image(image: Any) -> dict[str, str]:
    """Recover {"background", "color", "shape"} from an image of the shapes data set ("other": none fits)."""
    rgb = to_numpy_rgb(image)
    bg_rgb, share = _background(rgb)
    background = palette_name(bg_rgb) if share >= BACKGROUND_SHARE else OTHER

    # Seed: clearly-not-background pixels, largest object. Its interior gives the shape colour.
    distance = np.linalg.norm(rgb - bg_rgb, axis=2)
    objects = _objects(distance > SEED_THRESHOLD)
    if not objects:  # nothing drawn
        return {"background": background, "color": OTHER, "shape": OTHER}
    seed = objects[0]
    core = _erode(seed)
    inner = core if core.sum() >= 4 else seed
    # Blur mixes background into small shapes; their purest pixels are the ones farthest from it.
    inner = inner & (distance >= np.median(distance[inner]))
    shape_rgb = np.median(rgb[inner], axis=0)
    color = palette_name(shape_rgb, exclude=background)

    # Blur only blends background and shape colour; pixels far off that line are a third colour.
    direction = shape_rgb - bg_rgb
    t = (rgb - bg_rgb) @ direction / max(float(direction @ direction), 1e-6)
    off_line = np.linalg.norm(rgb - bg_rgb - t[..., None] * direction, axis=2)
    two_colours = (off_line[seed] > SEED_THRESHOLD).mean() > MAX_OFF_COLOR_FRAC
    if two_colours:
        color = OTHER

    # Re-cut the mask halfway between the two colours so blurred edges split evenly; keep the blob
    # that holds most of the seed. With a third colour there is no single halfway: keep the seed.
    labels = _labels(t > 0.5)
    values, counts = np.unique(labels[seed & (labels >= 0)], return_counts=True)
    mask = labels == values[np.argmax(counts)] if len(values) else seed
    if two_colours or mask.sum() < seed.sum() / 2:  # the re-cut fell apart (odd colours): keep the seed
        mask = seed
    if len(objects) > 1 and objects[1].sum() >= SECOND_OBJECT_FRAC * seed.sum():
        shape = OTHER  # two shapes
    else:
        shape = classify_shape(mask)
    return {"background": background, "color": color, "shape": shape}


def _as_list(images: torch.Tensor | Sequence[Any], captions: Sequence[str]) -> list[Any]:
    """Check a batch against its captions; a Bx3xHxW tensor becomes a list of 3xHxW tensors."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a Bx3xHxW tensor, got shape {tuple(images.shape)}")
        images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("scoring needs at least one image")
    return list(images)


def analyze_batch(
    images: torch.Tensor | Sequence[Any], captions: Sequence[str]
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(wanted, got) attribute dicts per image, so accuracy and confusion share one analysis."""
    return [
        (parse_caption(caption), analyze_image(image))
        for image, caption in zip(_as_list(images, captions), captions, strict=True)
    ]


def accuracy_from(pairs: Sequence[tuple[dict[str, str], dict[str, str]]]) -> dict[str, float]:
    """Fraction of (wanted, got) pairs that match per attribute, and on all three."""
    hits = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    for want, got in pairs:
        matches = [got[key] == want[key] for key in ATTRIBUTES]
        for key, ok in zip(ATTRIBUTES, matches, strict=True):
            hits[key] += ok
        hits["all"] += all(matches)
    return {key: value / len(pairs) for key, value in hits.items()}


def confusion_from(pairs: Sequence[tuple[dict[str, str], dict[str, str]]]) -> Confusion:
    """{attribute: {wanted: {got: count}}} over (wanted, got) pairs, keys sorted."""
    table: Confusion = {key: {} for key in ATTRIBUTES}
    for want, got in pairs:
        for key in ATTRIBUTES:
            row = table[key].setdefault(want[key], {})
            row[got[key]] = row.get(got[key], 0) + 1
    return {
        key: {w: dict(sorted(row.items())) for w, row in sorted(rows.items())} for key, rows in table.items()
    }


def prompt_accuracy(images: torch.Tensor | Sequence[Any], captions: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose colour, background, shape (and all three) match their caption.

    `images` is a Bx3xHxW tensor in [-1, 1] or a list of anything `analyze_image` takes.
    """
    return accuracy_from(analyze_batch(images, captions))


def confusion(images: torch.Tensor | Sequence[Any], captions: Sequence[str]) -> Confusion:
    """Per attribute, wanted -> got -> count (got may be "other"): which shapes and colours still fail."""
    return confusion_from(analyze_batch(images, captions))


def confusion_errors(table: Confusion) -> Confusion:
    """Only the misses of a confusion table (wanted != got), empty rows and attributes dropped."""
    out: Confusion = {}
    for key, rows in table.items():
        for want, row in rows.items():
            misses = {got: n for got, n in row.items() if got != want}
            if misses:
                out.setdefault(key, {})[want] = misses
    return out
