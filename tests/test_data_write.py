"""The shard writer: folder or list in, img2dataset-layout shards out, readable by the data module."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.datamodule import ShardDataModule
from ldm.data.pipeline import ValStream, expand_shards
from ldm.data.write_shards import main

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path) -> Path:
    """7 images: 6 good (jpg, png, webp, in a subfolder too), one corrupt; one good image has no caption."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(6):
        ext = ("jpg", "png", "webp")[i % 3]
        folder = images / "sub" if i >= 4 else images
        Image.new("RGB", (12 + i, 10), (i * 40, 100, 50)).save(folder / f"img{i}.{ext}")
        if i != 2:
            (folder / f"img{i}.txt").write_text(f"caption {i}")
    (images / "broken.jpg").write_bytes(b"not an image")
    return images


def _read(out: Path) -> list[dict]:
    return [{"key": k, "caption": c} for b in ValStream(expand_shards(out), resolution=8, batch_size=16)
            for k, c in zip(b["key"], b["caption"], strict=True)]


def test_folder_to_shards(tmp_path: Path) -> None:
    summary = main(["--images", str(_folder(tmp_path)), "--out", str(tmp_path / "out"), "--shard-size", "3",
                    "--processes", "2", "--no-progress"])
    assert summary == {"shards": 3, "samples": 6, "failed": 1, "out": str(tmp_path / "out")}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [2, 3, 1] and sum(s["failed_to_decode"] for s in stats) == 1
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    # sorted paths: broken.jpg took key 0 and was left out
    assert names == ["000000001.jpg", "000000001.txt", "000000001.json", "000000002.png", "000000002.txt",
                     "000000002.json"]
    samples = _read(out)
    assert len(samples) == 6 and {s["caption"] for s in samples} == {f"caption {i}" for i in (0, 1, 3, 4, 5)} | {""}
    # the counts in _stats.json give a finite epoch without a scan
    dm = ShardDataModule(train_shards=str(out), val_shards=None, resolution=8, batch_size=2, num_workers=0,
                         mode="finite", index_file=str(tmp_path / "no-scan.json"))
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 3 and not (tmp_path / "no-scan.json").exists()
    with pytest.raises(FileExistsError, match="already holds shards"):
        main(["--images", str(tmp_path / "images"), "--out", str(out), "--no-progress"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_list_to_shards(tmp_path: Path, fmt: str) -> None:
    images = _folder(tmp_path)
    rows = [("images/img0.jpg", "a, quoted \"caption\""), (str(images / "img1.png"), "absolute path")]
    if fmt == "csv":
        lines = ["path,caption", *(f'{p},"{c.replace(chr(34), chr(34) * 2)}"' for p, c in rows)]
    else:
        lines = [json.dumps({"image": p, "text": c}) for p, c in rows]
    listing = tmp_path / f"list.{fmt}"
    listing.write_text("\n".join(lines) + "\n")
    main(["--list", str(listing), "--out", str(tmp_path / "out"), "--processes", "1", "--no-progress"])
    assert [s["caption"] for s in _read(tmp_path / "out")] == [c for _, c in rows]


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    _folder(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ldm.data.write_shards", "--images", str(tmp_path / "images"),
                           "--out", str(tmp_path / "out"), "--shard-size", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 samples in 2 shards" in proc.stdout and "failed: " in proc.stdout
    assert "writing shards" in proc.stderr  # the progress bar
