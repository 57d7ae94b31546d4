"""The shapes analyzer is as strict as a person looking at the picture, and no stricter.

Hand-picked failures (drawn here with PIL) must not count as their caption; true renders,
also small, big, noisy, blurred, resized or slightly off-colour, must.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ldm.data.analyze import (
    OTHER,
    analyze_image,
    concavity,
    confusion,
    confusion_errors,
    palette_name,
    prompt_accuracy,
)
from ldm.data.shapes import PALETTE, render, size_range

Box = tuple[float, float, float, float]


def _canvas(res: int, background: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (res, res), PALETTE[background])
    return image, ImageDraw.Draw(image)


def _box(res: int, x: float, y: float, w: float, h: float | None = None) -> Box:
    """A box given in 32-px units, scaled to `res`, as PIL's inclusive corners."""
    k = res / 32
    return (x * k, y * k, (x + w) * k - 1, (y + (w if h is None else h)) * k - 1)


def diamond(res: int) -> Image.Image:
    """A square turned 45 degrees: four corners where a circle has none."""
    image, draw = _canvas(res, "blue")
    x0, y0, x1, y1 = _box(res, 9, 8, 14)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=PALETTE["red"])
    return image


def notched_square(res: int) -> Image.Image:
    """A square with a notch a quarter of its side wide and deep cut into the middle of its top."""
    image, draw = _canvas(res, "blue")
    draw.rectangle(_box(res, 9, 8, 13), fill=PALETTE["red"])
    side = 13 * res // 32
    notch = round(side / 4)
    left = 9 * res // 32 + (side - notch) // 2
    draw.rectangle((left, 8 * res // 32, left + notch - 1, 8 * res // 32 + notch - 1), fill=PALETTE["blue"])
    return image


def cup(res: int) -> Image.Image:
    """A U: a square hollowed out from the top, walls a quarter of its side thick."""
    image, draw = _canvas(res, "blue")
    x0, y0, x1, y1 = _box(res, 9, 8, 14)
    wall = (x1 - x0 + 1) // 4
    draw.rectangle((x0, y0, x1, y1), fill=PALETTE["red"])
    draw.rectangle((x0 + wall, y0, x1 - wall, y1 - wall), fill=PALETTE["blue"])
    return image


def ellipse(res: int) -> Image.Image:
    """Twice as wide as tall."""
    image, draw = _canvas(res, "blue")
    draw.ellipse(_box(res, 8, 12, 16, 8), fill=PALETTE["red"])
    return image


def blob(res: int) -> Image.Image:
    """Two overlapping circles along the diagonal: a square bounding box, but no circle."""
    image, draw = _canvas(res, "blue")
    for corner in (8, 13):
        draw.ellipse(_box(res, corner, corner, 10), fill=PALETTE["red"])
    return image


def crescent(res: int) -> Image.Image:
    """A circle with a bite the size of a circle taken out of its right."""
    image, draw = _canvas(res, "blue")
    draw.ellipse(_box(res, 8, 8, 14), fill=PALETTE["red"])
    draw.ellipse(_box(res, 13, 6, 14), fill=PALETTE["blue"])
    return image


def ring(res: int) -> Image.Image:
    """A circle with a hole: round outline, but no disc."""
    image, draw = _canvas(res, "blue")
    draw.ellipse(_box(res, 9, 9, 14), fill=PALETTE["red"])
    draw.ellipse(_box(res, 13, 13, 6), fill=PALETTE["blue"])
    return image


def star(res: int) -> Image.Image:
    """A five-pointed star: fills a square box about as much as a triangle, but is concave."""
    image, draw = _canvas(res, "blue")
    k = res / 32
    radii = [7 * k if i % 2 == 0 else 3 * k for i in range(10)]
    angles = [i * np.pi / 5 for i in range(10)]
    draw.polygon(
        [(16 * k + r * np.sin(a), 16 * k - r * np.cos(a)) for r, a in zip(radii, angles, strict=True)],
        fill=PALETTE["red"],
    )
    return image


def two_shapes(res: int) -> Image.Image:
    """A circle and a square: the caption asks for one shape."""
    image, draw = _canvas(res, "blue")
    draw.ellipse(_box(res, 3, 3, 10), fill=PALETTE["red"])
    draw.rectangle(_box(res, 18, 18, 10), fill=PALETTE["red"])
    return image


def empty(res: int) -> Image.Image:
    """Background only."""
    return _canvas(res, "blue")[0]


def split_background(res: int) -> Image.Image:
    """Green over the top 40%, blue below, a red circle in the blue part."""
    image, draw = _canvas(res, "blue")
    draw.rectangle((0, 0, res - 1, round(0.4 * res) - 1), fill=PALETTE["green"])
    draw.ellipse(_box(res, 10, 17, 12), fill=PALETTE["red"])
    return image


def graded_background(res: int) -> Image.Image:
    """Blue fading into green from left to right, a red circle in the middle."""
    t = np.linspace(0.0, 1.0, res)[None, :, None]
    row = (1 - t) * np.array(PALETTE["blue"]) + t * np.array(PALETTE["green"])
    image = Image.fromarray(np.repeat(row, res, axis=0).round().astype(np.uint8))
    ImageDraw.Draw(image).ellipse(_box(res, 10, 10, 12), fill=PALETTE["red"])
    return image


def tilted_square(res: int, degrees: float, side: float = 0.42) -> Image.Image:
    """A square of `side` x the image side, turned by `degrees` about the image centre."""
    image, draw = _canvas(res, "blue")
    half_diagonal, centre = side * res / np.sqrt(2), res / 2
    corners = [np.radians(degrees + 45 + 90 * k) for k in range(4)]
    draw.polygon(
        [(centre + half_diagonal * np.cos(a), centre + half_diagonal * np.sin(a)) for a in corners],
        fill=PALETTE["red"],
    )
    return image


def _mix(a: str, b: str, frac: float) -> tuple[int, ...]:
    """The colour `frac` of the way from palette colour a to b."""
    return tuple(round((1 - frac) * p + frac * q) for p, q in zip(PALETTE[a], PALETTE[b], strict=True))


def mixed_colour(a: str, b: str, frac: float = 0.5, shape: str = "circle") -> Callable[[int], Image.Image]:
    """A circle (or square) in a mix of two palette colours on white."""

    def draw_it(res: int) -> Image.Image:
        image, draw = _canvas(res, "white")
        (draw.ellipse if shape == "circle" else draw.rectangle)(_box(res, 10, 10, 12), fill=_mix(a, b, frac))
        return image

    return draw_it


def two_colour_square(res: int) -> Image.Image:
    """Top half red, bottom half blue: neither a red nor a blue square."""
    image, draw = _canvas(res, "white")
    draw.rectangle(_box(res, 9, 9, 14, 7), fill=PALETTE["red"])
    draw.rectangle(_box(res, 9, 16, 14, 7), fill=PALETTE["blue"])
    return image


def degrade(image: Image.Image, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """What a diffusion sample looks like: blur 0.7 px per 32 px, Gaussian noise (std in [-1, 1] units)."""
    res = image.size[0]
    array = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7 * res / 32)), dtype=np.float64)
    array = array + np.random.default_rng(seed).normal(0.0, noise * 127.5, array.shape)
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


# (name, drawing, caption it is scored against, attributes that must read "other")
FAILURES: list[tuple[str, Callable[[int], Image.Image], str, dict[str, str]]] = [
    ("diamond as circle", diamond, "a red circle on a blue background", {"shape": OTHER}),
    ("diamond as square", diamond, "a red square on a blue background", {"shape": OTHER}),
    ("notched square", notched_square, "a red square on a blue background", {"shape": OTHER}),
    ("cup", cup, "a red square on a blue background", {"shape": OTHER}),
    ("2:1 ellipse", ellipse, "a red circle on a blue background", {"shape": OTHER}),
    ("two merged circles", blob, "a red circle on a blue background", {"shape": OTHER}),
    ("crescent", crescent, "a red circle on a blue background", {"shape": OTHER}),
    ("ring", ring, "a red circle on a blue background", {"shape": OTHER}),
    ("star", star, "a red triangle on a blue background", {"shape": OTHER}),
    ("two shapes", two_shapes, "a red circle on a blue background", {"shape": OTHER}),
    ("empty", empty, "a red circle on a blue background", {"color": OTHER, "shape": OTHER}),
    ("split background", split_background, "a red circle on a blue background", {"background": OTHER}),
    ("graded background", graded_background, "a red circle on a blue background", {"background": OTHER}),
    ("red/blue mix", mixed_colour("red", "blue"), "a red circle on a white background", {"color": OTHER}),
    (
        "yellow/orange mix",
        mixed_colour("yellow", "orange"),
        "a yellow circle on a white background",
        {"color": OTHER},
    ),
    (
        "red/purple mix",
        mixed_colour("red", "purple", shape="square"),
        "a purple square on a white background",
        {"color": OTHER},
    ),
    ("mid grey", mixed_colour("white", "black"), "a black circle on a white background", {"color": OTHER}),
    ("two colours", two_colour_square, "a red square on a white background", {"color": OTHER}),
]


@pytest.mark.parametrize(("name", "draw", "caption", "wrong"), FAILURES, ids=[f[0] for f in FAILURES])
def test_hand_picked_failures(name: str, draw: Callable, caption: str, wrong: dict[str, str]) -> None:
    """Each failure reads "other" on the wrong attribute at 32 and 64 px, clean and noisy, and scores 0."""
    for image in (draw(32), draw(64), degrade(draw(32)), degrade(draw(64), seed=1)):
        got = analyze_image(image)
        assert {key: got[key] for key in wrong} == wrong, (name, got)
        assert prompt_accuracy([image], [caption])["all"] == 0.0


def test_failures_keep_what_is_right() -> None:
    """Strictness is per attribute: a diamond's colour and background still count."""
    assert analyze_image(diamond(32)) == {"background": "blue", "color": "red", "shape": OTHER}
    assert analyze_image(split_background(32)) == {"background": OTHER, "color": "red", "shape": "circle"}
    assert analyze_image(mixed_colour("yellow", "orange")(64)) == {
        "background": "white",
        "color": OTHER,
        "shape": "circle",
    }
    assert analyze_image(two_colour_square(32))["shape"] == "square"


def test_tilted_squares() -> None:
    """A square turned by up to 10 degrees is still a square; turned any amount it is never a circle."""
    for res in (32, 64):
        for degrees in (3, 5, 10):
            assert analyze_image(tilted_square(res, degrees))["shape"] == "square", (res, degrees)
        for degrees in range(0, 50, 5):
            for side in (0.3, 0.42):
                assert analyze_image(tilted_square(res, degrees, side))["shape"] != "circle", (
                    res,
                    degrees,
                    side,
                )
        for side in (0.3, 0.42):  # at 45 degrees: a diamond
            assert analyze_image(tilted_square(res, 45, side))["shape"] == OTHER


def test_confusion_on_the_failures(capsys: pytest.CaptureFixture[str]) -> None:
    """The confusion table says what each failure was read as."""
    images = [draw(32) for _, draw, _, _ in FAILURES]
    captions = [caption for _, _, caption, _ in FAILURES]
    table = confusion(images, captions)
    with capsys.disabled():  # printed for the record: which attributes each failure was wrong on
        print("\nconfusion on the hand-picked failures (wanted -> got: count):")
        for attribute, rows in table.items():
            print(f"  {attribute}: {json.dumps(rows)}")
    # circles read right only where the picture's fault is its colour or split background
    assert table["shape"]["circle"] == {"circle": 4, OTHER: 8}
    assert table["shape"]["square"] == {"square": 2, OTHER: 3}  # the two colour failures keep their square
    # red read as other: empty, graded background (no object found), red/blue mix, two colours
    assert table["color"]["red"] == {"red": 11, OTHER: 4}
    assert table["color"]["yellow"] == {OTHER: 1} and table["color"]["purple"] == {OTHER: 1}
    assert table["background"]["blue"] == {"blue": 11, OTHER: 2}
    assert table["shape"]["triangle"] == {OTHER: 1}
    errors = confusion_errors(table)
    assert errors["shape"] == {"circle": {OTHER: 8}, "square": {OTHER: 3}, "triangle": {OTHER: 1}}
    assert set(errors) == {"color", "background", "shape"}
    assert sum(n for row in table["shape"].values() for n in row.values()) == len(FAILURES)


def _render_exact(res: int, shape: str, size: int, color: str, background: str) -> Image.Image:
    """A data-set render with chosen attributes (same drawing calls as ldm.data.shapes.render)."""
    image, draw = _canvas(res, background)
    x = y = (res - size) // 3
    box = (x, y, x + size - 1, y + size - 1)
    if shape == "square":
        draw.rectangle(box, fill=PALETTE[color])
    elif shape == "circle":
        draw.ellipse(box, fill=PALETTE[color])
    else:
        draw.polygon(
            [(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=PALETTE[color]
        )
    return image


@pytest.mark.parametrize("res", [32, 64])
def test_true_shapes_small_and_big_clean_and_noisy(res: int) -> None:
    """Smallest and largest size of every shape, low- and high-contrast colour pairs, clean and degraded."""
    pairs = [
        ("yellow", "orange"),
        ("orange", "yellow"),
        ("black", "white"),
        ("purple", "blue"),
        ("green", "red"),
    ]
    for size in size_range(res):
        for shape in ("circle", "square", "triangle"):
            for i, (color, background) in enumerate(pairs):
                clean = _render_exact(res, shape, size, color, background)
                want = {"background": background, "color": color, "shape": shape}
                assert analyze_image(clean) == want, (res, size, shape, color, background)
                assert analyze_image(degrade(clean, seed=i)) == want, (
                    "noisy",
                    res,
                    size,
                    shape,
                    color,
                    background,
                )


def test_true_shapes_resized_and_off_colour() -> None:
    """Bicubic 48 -> 32 px (the data loader's resize) and colours shifted by 25 RGB units still count."""
    rng, noise = random.Random(3), np.random.default_rng(3)
    images, captions = [], []
    for _ in range(40):
        image, meta = render(rng, 48)
        array = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
        for key in ("color", "background"):  # a slightly wrong shade, as a sample might have
            pure = (np.asarray(image.resize((32, 32), Image.Resampling.NEAREST)) == PALETTE[meta[key]]).all(
                axis=2
            )
            shift = noise.normal(size=3)
            array[pure] += 25.0 * shift / np.linalg.norm(shift)
        images.append(np.clip(np.round(array), 0, 255).astype(np.uint8))
        captions.append(meta["caption"])
    assert prompt_accuracy(images, captions) == {"color": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}


def test_colour_tolerance_is_relative_to_palette_spacing() -> None:
    """Yellow and orange are ~81 apart: 30% of the way is still yellow, halfway is neither, 70% is orange."""
    assert palette_name(np.array(_mix("yellow", "orange", 0.3), dtype=float)) == "yellow"
    assert palette_name(np.array(_mix("yellow", "orange", 0.5), dtype=float)) == OTHER
    assert palette_name(np.array(_mix("yellow", "orange", 0.7), dtype=float)) == "orange"
    # far-apart colours get more room, but a mid grey is neither white nor black
    assert palette_name(np.array([215.0, 215.0, 215.0])) == "white"
    assert palette_name(np.array([128.0, 128.0, 128.0])) == OTHER
    assert palette_name(np.array(PALETTE["red"], dtype=float), exclude="red") == OTHER


def test_concavity() -> None:
    """Digitally convex masks are exactly solid; a notch is found by its depth even when small."""
    yy, xx = np.mgrid[0:20, 0:20]
    disk = (yy - 9.5) ** 2 + (xx - 9.5) ** 2 <= 8**2
    assert concavity(disk) == (1.0, 0.0)
    square = np.zeros((20, 20), dtype=bool)
    square[4:16, 4:16] = True
    notched = square.copy()
    notched[4:7, 8:11] = False  # 3 x 3 out of the top edge
    solidity, depth = concavity(notched)
    assert solidity == pytest.approx(135 / 144) and depth == 2.0
    cup_mask = square.copy()
    cup_mask[4:13, 7:13] = False
    assert concavity(cup_mask)[0] < 0.7
