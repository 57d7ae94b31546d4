"""The built-in synthetic data set "shapes": one coloured shape on a plain background.

It exists so that the whole pipeline (autoencoder, text-conditioned latent
diffusion, sampling) can be trained and checked in minutes on one CPU: every
caption is fully determined by the image, so generated samples can be scored by
pixel statistics (see `ldm.data.analyze`). Shards are written in img2dataset's
WebDataset layout so the same loader serves real data.

    python -m ldm.data.shapes --out data/shapes --num 20000 --num-val 512
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import tarfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
COLORS = tuple(PALETTE)

# Shape bounding-box side as a fraction of the image side.
MIN_SIZE_FRAC = 0.25
MAX_SIZE_FRAC = 0.45

_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def make_caption(color: str, shape: str, background: str) -> str:
    """The one caption format used for training, prompts and scoring."""
    return f"a {color} {shape} on a {background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of `make_caption`, so generated samples can be scored against their prompt."""
    match = _CAPTION_RE.match(caption.strip())
    if match is None:
        raise ValueError(
            f"caption {caption!r} does not match 'a <color> <shape> on a <background> background'"
        )
    color, shape, background = match.groups()
    for word, vocab, what in (
        (color, COLORS, "color"),
        (shape, SHAPES, "shape"),
        (background, COLORS, "background"),
    ):
        if word not in vocab:
            raise ValueError(f"caption {caption!r}: unknown {what} {word!r}; expected one of {list(vocab)}")
    return {"color": color, "shape": shape, "background": background}


def size_range(resolution: int) -> tuple[int, int]:
    """Inclusive pixel range of the shape's bounding-box side at `resolution`."""
    lo = max(1, math.ceil(MIN_SIZE_FRAC * resolution))
    hi = max(lo, math.floor(MAX_SIZE_FRAC * resolution))
    return lo, hi


def canvas_size(rng: random.Random, resolution: int, max_ratio: float) -> tuple[int, int]:
    """(width, height) of about resolution**2 pixels, log-uniform aspect ratio within 1/max_ratio..max_ratio."""
    ratio = math.exp(rng.uniform(-math.log(max_ratio), math.log(max_ratio)))
    return max(4, round(resolution * math.sqrt(ratio))), max(4, round(resolution / math.sqrt(ratio)))


def render(rng: random.Random, resolution: int = 32,
           size_wh: tuple[int, int] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one random sample; returns the image and its attributes (x, y: top-left of the shape's box).

    `size_wh` (width, height) draws a non-square canvas; the shape's size follows its shorter side.
    """
    if resolution < 4:
        raise ValueError(f"resolution must be at least 4, got {resolution}")
    width, height = size_wh or (resolution, resolution)
    color = rng.choice(COLORS)
    background = rng.choice([c for c in COLORS if c != color])
    shape = rng.choice(SHAPES)
    size = rng.randint(*size_range(min(width, height)))
    x = rng.randint(0, width - size)
    y = rng.randint(0, height - size)

    image = Image.new("RGB", (width, height), PALETTE[background])
    draw = ImageDraw.Draw(image)
    box = (x, y, x + size - 1, y + size - 1)  # inclusive pixel corners
    fill = PALETTE[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:  # upright triangle: apex at the top centre, flat base along the bottom row
        draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)

    meta = {
        "color": color,
        "shape": shape,
        "background": background,
        "size": size,
        "x": x,
        "y": y,
        "caption": make_caption(color, shape, background),
        "width": width,
        "height": height,
    }
    if size_wh is not None:  # as img2dataset --resize_mode keep_ratio records it (nothing was resized here)
        meta.update(original_width=width, original_height=height)
    return image, meta


def all_prompts() -> list[str]:
    """Every caption the data set can produce (8 colours x 3 shapes x 7 backgrounds = 168)."""
    return [
        make_caption(color, shape, background)
        for color in COLORS
        for shape in SHAPES
        for background in COLORS
        if background != color
    ]


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """`n` prompts spread evenly over colours, backgrounds and shapes, for validation sampling.

    Colours come in blocks of 8 (a random permutation each), backgrounds are that
    permutation shifted by a random non-zero offset (so also a permutation, never
    equal to the colour), shapes in shuffled blocks of 3. Any 8 consecutive prompts
    therefore use every colour and every background once.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"shapes-prompts:{seed}")
    k = len(COLORS)
    colors: list[str] = []
    backgrounds: list[str] = []
    while len(colors) < n:
        perm = list(range(k))
        rng.shuffle(perm)
        offset = rng.randrange(1, k)
        colors += [COLORS[i] for i in perm]
        backgrounds += [COLORS[(i + offset) % k] for i in perm]
    shapes: list[str] = []
    while len(shapes) < n:
        block = list(SHAPES)
        rng.shuffle(block)
        shapes += block
    return [make_caption(colors[i], shapes[i], backgrounds[i]) for i in range(n)]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add bytes with fixed metadata so equal content gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_split(out_dir: Path, num: int, resolution: int, rng: random.Random, shard_size: int,
                 max_ratio: float | None = None) -> list[dict]:
    """Write one split's shards; returns [{"path" (relative to the data set root), "num_samples"}]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tar"):  # a smaller rewrite must not leave old shards behind
        stale.unlink()
    shards = []
    for shard_index, start in enumerate(range(0, num, shard_size)):
        path = out_dir / f"{shard_index:05d}.tar"
        count = min(shard_size, num - start)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, start + count):
                size_wh = canvas_size(rng, resolution, max_ratio) if max_ratio else None
                image, meta = render(rng, resolution, size_wh)
                key = f"{index:09d}"
                meta["key"] = key
                png = io.BytesIO()
                image.save(png, format="PNG")
                _add_member(tar, f"{key}.png", png.getvalue())
                _add_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        shards.append({"path": f"{out_dir.name}/{path.name}", "num_samples": count})
    return shards


def write_shapes(
    out: str | Path,
    num_train: int,
    num_val: int,
    resolution: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
    max_ratio: float | None = None,
) -> dict[str, Any]:
    """Write train/ and val/ shards plus info.json (parameters and per-shard counts) under `out`.

    Train and val use different seeds derived from `seed`, so they never share a
    random stream. info.json lists shard paths relative to `out` (so the data set
    can be moved); the returned summary is info.json plus `out` and the full shard
    paths as `train_shards` and `val_shards`, ready for the data module.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"sample counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_ratio is not None and max_ratio < 1.0:
        raise ValueError(f"--max-ratio must be >= 1, got {max_ratio}")
    out = Path(out)
    splits = {}
    for split, num in (("train", num_train), ("val", num_val)):
        rng = random.Random(f"shapes:{seed}:{split}")
        shards = _write_split(out / split, num, resolution, rng, shard_size, max_ratio)
        splits[split] = {"num_samples": num, "shards": shards}
    info = {
        "dataset": "shapes",
        "resolution": resolution,
        "seed": seed,
        "shard_size": shard_size,
        "splits": splits,
    }
    if max_ratio:
        info["max_ratio"] = max_ratio
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return {
        **info,
        "out": str(out),
        "train_shards": [str(out / shard["path"]) for shard in splits["train"]["shards"]],
        "val_shards": [str(out / shard["path"]) for shard in splits["val"]["shards"]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: write the shapes data set and print what was written."""
    parser = argparse.ArgumentParser(description="Write the synthetic shapes data set as WebDataset shards.")
    parser.add_argument("--out", default="data/shapes", help="output directory (train/, val/, info.json)")
    parser.add_argument("--num", type=int, default=20000, help="number of training images")
    parser.add_argument("--num-val", type=int, default=512, help="number of validation images")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=2000, help="samples per .tar shard")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="non-square images (about resolution**2 pixels, aspect ratio within 1/R..R), with "
                             "img2dataset keep_ratio's json width/height/original_*; for data.buckets")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = write_shapes(args.out, args.num, args.num_val, args.resolution, args.seed, args.shard_size,
                        args.max_ratio)
    elapsed = time.perf_counter() - start
    for split, entry in info["splits"].items():
        print(
            f"{split}: {entry['num_samples']} images in {len(entry['shards'])} shards "
            f"under {Path(args.out) / split}"
        )
    print(f"wrote {Path(args.out) / 'info.json'} ({args.resolution}px, seed {args.seed}) in {elapsed:.1f}s")
    return info


if __name__ == "__main__":
    main()
