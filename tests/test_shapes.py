"""The synthetic shapes data set and the analyzer that scores images against captions."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm.data.analyze import analyze_image, prompt_accuracy
from ldm.data.shapes import (
    COLORS,
    PALETTE,
    SHAPES,
    all_prompts,
    main,
    make_caption,
    parse_caption,
    prompt_set,
    render,
    size_range,
    write_shapes,
)


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_shapes(tmp_path_factory.mktemp("shapes"), num_train=25, num_val=7, shard_size=10)


def test_palette_and_vocabulary() -> None:
    assert list(PALETTE) == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    assert PALETTE["purple"] == (150, 40, 200)
    assert SHAPES == ("circle", "square", "triangle")


def test_write_is_deterministic(tmp_path: Path) -> None:
    a = write_shapes(tmp_path / "a", num_train=12, num_val=4, shard_size=5, seed=3)
    b = write_shapes(tmp_path / "b", num_train=12, num_val=4, shard_size=5, seed=3)
    c = write_shapes(tmp_path / "c", num_train=12, num_val=4, shard_size=5, seed=4)
    for split in ("train_shards", "val_shards"):
        for pa, pb in zip(a[split], b[split], strict=True):
            assert Path(pa).read_bytes() == Path(pb).read_bytes()
    assert Path(a["train_shards"][0]).read_bytes() != Path(c["train_shards"][0]).read_bytes()
    # train and val come from different streams
    train_png = _tar_members(Path(a["train_shards"][0]))[0][1]
    val_png = _tar_members(Path(a["val_shards"][0]))[0][1]
    assert train_png != val_png


def test_layout_and_info(written: dict) -> None:
    root = Path(written["out"])
    assert [Path(p).name for p in written["train_shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [Path(p).parent.name for p in written["val_shards"]] == ["val"]
    info = json.loads((root / "info.json").read_text())
    assert info["resolution"] == 32 and info["seed"] == 0 and info["shard_size"] == 10
    assert info["splits"]["train"]["num_samples"] == 25
    assert [s["num_samples"] for s in info["splits"]["train"]["shards"]] == [10, 10, 5]
    assert info["splits"]["train"]["shards"][1]["path"] == "train/00001.tar"

    names = [name for name, _ in _tar_members(Path(written["train_shards"][1]))]
    expected = [f"{i:09d}.{ext}" for i in range(10, 20) for ext in ("png", "txt", "json")]
    assert names == expected


def test_samples_are_consistent(written: dict) -> None:
    lo, hi = size_range(32)
    assert (lo, hi) == (8, 14)
    for shard in written["train_shards"] + written["val_shards"]:
        members = dict(_tar_members(Path(shard)))
        keys = sorted({name.split(".")[0] for name in members})
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            caption = members[f"{key}.txt"].decode()
            assert meta["key"] == key
            assert (
                caption == meta["caption"] == make_caption(meta["color"], meta["shape"], meta["background"])
            )
            assert meta["color"] != meta["background"]
            assert lo <= meta["size"] <= hi
            assert 0 <= meta["x"] and meta["x"] + meta["size"] <= 32
            assert 0 <= meta["y"] and meta["y"] + meta["size"] <= 32
            image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
            assert image.shape == (32, 32, 3) == (meta["height"], meta["width"], 3)
            is_shape = (image == PALETTE[meta["color"]]).all(axis=2)
            is_background = (image == PALETTE[meta["background"]]).all(axis=2)
            assert (is_shape | is_background).all()  # crisp, pure palette colours
            ys, xs = np.nonzero(is_shape)
            assert xs.min() >= meta["x"] and xs.max() < meta["x"] + meta["size"]
            assert ys.min() >= meta["y"] and ys.max() < meta["y"] + meta["size"]
            assert xs.max() - xs.min() + 1 == meta["size"]  # every shape spans its box's width


def test_render_other_resolution() -> None:
    image, meta = render(random.Random(0), 64)
    assert image.size == (64, 64)
    assert 16 <= meta["size"] <= 28


def test_parse_caption_round_trip_and_errors() -> None:
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 8 * 3 * 7
    for prompt in prompts:
        parsed = parse_caption(prompt)
        assert make_caption(**parsed) == prompt
    with pytest.raises(ValueError, match="does not match"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        parse_caption("a red hexagon on a blue background")


def test_prompt_set_covers_vocabulary() -> None:
    prompts = prompt_set(64)
    assert prompts == prompt_set(64) and prompts != prompt_set(64, seed=1)
    parsed = [parse_caption(p) for p in prompts]
    colors = Counter(p["color"] for p in parsed)
    backgrounds = Counter(p["background"] for p in parsed)
    shapes = Counter(p["shape"] for p in parsed)
    assert colors == dict.fromkeys(COLORS, 8)
    assert backgrounds == dict.fromkeys(COLORS, 8)
    assert set(shapes) == set(SHAPES) and max(shapes.values()) - min(shapes.values()) <= 1
    assert all(p["color"] != p["background"] for p in parsed)
    assert len(prompt_set(5)) == 5 and prompt_set(0) == []


def _generated(resolution: int, n: int, noise: float = 0.0, blur: float = 0.0, seed: int = 0):
    """n rendered images (uint8 arrays) with optional blur and Gaussian noise (std in [-1, 1] units)."""
    rng, noise_rng = random.Random(seed), np.random.default_rng(seed)
    images, metas = [], []
    for _ in range(n):
        image, meta = render(rng, resolution)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        array = np.asarray(image, dtype=np.float64)
        if noise:
            array = array + noise_rng.normal(0.0, noise * 127.5, array.shape)
        images.append(np.clip(np.round(array), 0, 255).astype(np.uint8))
        metas.append(meta)
    return images, metas


def _accuracy(images: list, metas: list[dict]) -> float:
    keys = ("color", "background", "shape")
    hits = [all(analyze_image(im)[k] == m[k] for k in keys) for im, m in zip(images, metas, strict=True)]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyzer_clean(resolution: int) -> None:
    assert _accuracy(*_generated(resolution, 300, seed=resolution)) == 1.0


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyzer_noise_and_blur(resolution: int) -> None:
    images, metas = _generated(resolution, 300, noise=0.05, blur=0.7 * resolution / 32, seed=resolution + 1)
    assert _accuracy(images, metas) == 1.0


def test_analyzer_inputs_agree() -> None:
    image, meta = render(random.Random(5), 32)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0
    want = {k: meta[k] for k in ("color", "background", "shape")}
    assert analyze_image(image) == analyze_image(array) == analyze_image(tensor) == want


def test_prompt_accuracy_on_batches() -> None:
    images, metas = _generated(32, 40, seed=7)
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1.0 for im in images])
    captions = [m["caption"] for m in metas]
    assert prompt_accuracy(batch, captions) == {"color": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}
    assert prompt_accuracy(images, captions)["all"] == 1.0
    shuffled = captions[1:] + captions[:1]
    scores = prompt_accuracy(batch, shuffled)
    assert scores["all"] < 0.5 and set(scores) == {"color", "background", "shape", "all"}
    with pytest.raises(ValueError):
        prompt_accuracy(batch, captions[:3])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path / "d"), "--num", "6", "--num-val", "2", "--resolution", "16"]
    main([*args, "--seed", "1", "--shard-size", "4"])
    out = capsys.readouterr().out
    assert "train: 6 images in 2 shards" in out and "val: 2 images in 1 shards" in out
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["00000.tar", "00001.tar"]
    assert json.loads((tmp_path / "d" / "info.json").read_text())["resolution"] == 16
