"""Bad and unusual data: every image mode becomes RGB, broken samples are skipped and counted, nothing is unpickled."""

from __future__ import annotations

import io
import pathlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.data.callbacks import DataStatsCallback
from ldm.data.datamodule import ShardDataModule
from ldm.data.decode import DecodeOptions, load_image, to_rgb
from ldm.data.pipeline import TrainStream, ValStream, shard_counts
from tests.conftest import TinyImageModule


class _WritesFile:
    """Unpickling this calls Path.write_text: the kind of payload a default webdataset decoder would run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "pwned"))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


BLUE = (0, 0, 255)


def write_bad_shard(path: Path, target: Path) -> dict[str, tuple[int, int, int]]:
    """One shard of every awkward case; returns the expected mean colour of each good sample."""
    good_jpeg = _encode(Image.new("RGB", (24, 16), (250, 140, 20)), "JPEG")
    rgba = Image.new("RGBA", (12, 12), (255, 0, 0, 0))  # fully transparent red: shows the background
    sixteen = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))  # 16-bit white
    assert sixteen.mode.startswith("I")
    palette = Image.new("RGB", (10, 10), (30, 180, 30)).convert("P")
    samples = {
        "000_truncated": ("jpg", good_jpeg[: len(good_jpeg) // 2], b"cut in half", None),
        "001_gray": ("jpg", _encode(Image.new("L", (16, 16), 128), "JPEG"), b"gray", (128, 128, 128)),
        "002_cmyk": ("jpg", _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), b"cmyk", (255, 0, 0)),
        "003_rgba": ("png", _encode(rgba, "PNG"), b"rgba", BLUE),
        "004_tiny": ("png", _encode(Image.new("RGB", (1, 1), (30, 60, 230)), "PNG"), b"one pixel", (30, 60, 230)),
        "005_nocaption": ("jpg", good_jpeg, None, (250, 140, 20)),
        "006_latin1": ("jpg", good_jpeg, "café".encode("latin-1"), (250, 140, 20)),
        "007_pickle": ("jpg", good_jpeg, b"has a pickle beside it", (250, 140, 20)),
        "008_i16": ("png", _encode(sixteen, "PNG"), b"sixteen bit", (255, 255, 255)),
        "009_palette": ("png", _encode(palette, "PNG"), b"palette", (30, 180, 30)),
        "010_la": ("png", _encode(Image.new("LA", (8, 8), (200, 0)), "PNG"), b"grey alpha", BLUE),
    }
    payload = pickle.dumps(_WritesFile(target))
    with tarfile.open(path, "w") as tar:
        for key, (ext, data, caption, _) in samples.items():
            _add(tar, f"{key}.{ext}", data)
            if caption is not None:
                _add(tar, f"{key}.txt", caption)
            if key == "007_pickle":
                _add(tar, f"{key}.pyd", payload)
                _add(tar, f"{key}.pickle", payload)
        _add(tar, "011_only_pickle.pyd", payload)  # a key with nothing the pipeline reads: not a sample
    return {key: colour for key, (_, _, _, colour) in samples.items() if colour is not None}


def test_the_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """Guard for the test below: the pickle really writes a file when loaded."""
    target = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(_WritesFile(target)))
    assert target.read_text() == "pwned"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_shard_counts_and_never_unpickles(tmp_path: Path, num_workers: int) -> None:
    target = tmp_path / "pwned.txt"
    expected = write_bad_shard(tmp_path / "00000.tar", target)
    stream = TrainStream([str(tmp_path / "00000.tar")], resolution=8, batch_size=2, mode="finite", counts=[11],
                         shuffle_buffer=0, background=BLUE)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(stream) == 5  # 11 samples // 2; the one that fails to decode is padded over
    totals = {k: sum(b["data_stats"][k] for b in batches) for k in batches[0]["data_stats"]}
    assert totals["skipped"] == 1 and totals["no_caption"] == 1 and totals["bad_caption"] == 1
    assert totals["samples"] == 10 and totals["filtered"] == 0  # the 11th, cut off by the batch count, is never read
    assert totals["padded"] == 1
    seen: dict[str, torch.Tensor] = {}
    captions: dict[str, str] = {}
    for batch in batches:
        for key, image, caption in zip(batch["key"], batch["image"], batch["caption"], strict=True):
            assert image.shape == (3, 8, 8)
            seen[key], captions[key] = image, caption
    assert "000_truncated" not in seen
    for key, image in seen.items():
        colour = ((image.mean((1, 2)) + 1) * 127.5).round()
        assert torch.allclose(colour, torch.tensor(expected[key], dtype=torch.float32), atol=6), (key, colour)
    assert captions["005_nocaption"] == "" and captions["006_latin1"] == "caf\ufffd"
    assert not target.exists()


def test_modes_and_filters(tmp_path: Path) -> None:
    assert to_rgb(Image.new("P", (2, 2))).mode == "RGB"
    assert to_rgb(Image.new("1", (2, 2))).mode == "RGB"
    jpeg = _encode(Image.new("RGB", (40, 10), (10, 10, 10)), "JPEG")
    with pytest.raises(Exception, match="min_size"):
        load_image(jpeg, DecodeOptions(resolution=8, min_size=16))
    half = Image.new("RGB", (20, 10), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    data = _encode(half, "PNG")
    import random

    flipped = load_image(data, DecodeOptions(resolution=10, crop="center", flip_p=1.0), random.Random(0))
    plain = load_image(data, DecodeOptions(resolution=10, crop="center"))
    assert torch.equal(flipped, plain.flip(-1))
    crops = {load_image(data, DecodeOptions(resolution=10, crop="random"), random.Random(s)).mean().item()
             for s in range(8)}
    assert len(crops) > 1  # random crops land in different places
    # min_size from the json metadata, before the image is decoded
    path = tmp_path / "sized.tar"
    with tarfile.open(path, "w") as tar:
        for i, size in enumerate((64, 8)):
            _add(tar, f"{i}.png", _encode(Image.new("RGB", (16, 16)), "PNG"))
            _add(tar, f"{i}.json", f'{{"original_width": {size}, "original_height": {size}}}'.encode())
    batches = list(ValStream([str(path)], resolution=8, batch_size=4, min_size=32))
    assert [b["key"] for b in batches] == [["0"]] and batches[0]["data_stats"]["filtered"] == 1


def _fit(tmp_path: Path, max_skip_fraction: float) -> DataStatsCallback:
    write_bad_shard(tmp_path / "00000.tar", tmp_path / "pwned.txt")
    dm = ShardDataModule(train_shards=str(tmp_path / "00000.tar"), val_shards=None, resolution=8, batch_size=2,
                         num_workers=0, mode="finite", shuffle_buffer=0, max_skip_fraction=max_skip_fraction,
                         index_file=str(tmp_path / "index.json"))
    callback = DataStatsCallback(max_skip_fraction=max_skip_fraction, every_n_batches=2, min_samples=4)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(TinyImageModule(), datamodule=dm)
    assert not (tmp_path / "pwned.txt").exists()
    return callback


def test_training_goes_on_and_counts_reach_the_callback(tmp_path: Path) -> None:
    callback = _fit(tmp_path, max_skip_fraction=0.5)
    assert callback.totals["skipped"] == 2 and callback.totals["samples"] == 20  # two epochs
    assert callback.totals["no_caption"] == 2 and callback.totals["bad_caption"] == 2


def test_too_many_skips_stop_the_run_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="max_skip_fraction"):
        _fit(tmp_path, max_skip_fraction=0.05)


def test_pipe_sources_and_failing_remote_shard_reported_by_name(tmp_path: Path, caplog) -> None:
    write_bad_shard(tmp_path / "00000.tar", tmp_path / "pwned.txt")
    local = [b["key"] for b in ValStream([str(tmp_path / "00000.tar")], resolution=8, batch_size=4)]
    piped = [b["key"] for b in ValStream([f"pipe:cat {tmp_path / '00000.tar'}"], resolution=8, batch_size=4)]
    assert piped == local and sum(len(k) for k in local) == 10
    gone = f"pipe:cat {tmp_path / 'gone.tar'}"
    stream = TrainStream([str(tmp_path / "00000.tar"), gone], resolution=8, batch_size=3, mode="finite",
                         counts=[11, 6], shuffle_buffer=0, retries=1)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert len(batches) == len(stream) == 5
    totals = {k: sum(b["data_stats"][k] for b in batches) for k in batches[0]["data_stats"]}
    assert totals["failed_shards"] == 1 and totals["skipped"] >= 4  # the lost samples count as skipped
    assert "retrying" in caplog.text and f"shard {gone} failed" in caplog.text


def test_http_shards_counts_from_remote_stats_and_missing_one_reported(tmp_path: Path, caplog, monkeypatch) -> None:
    """Shards over HTTP: counts from the _stats.json beside them (no scan), a 404 shard retried then named."""
    import functools
    import http.server
    import json
    import threading

    write_bad_shard(tmp_path / "00000.tar", tmp_path / "pwned.txt")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 11}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/00000.tar", f"{base}/00001.tar"]  # the second does not exist
        with monkeypatch.context() as patch:
            patch.setattr("ldm.data.shards.scan_count", lambda url: pytest.fail(f"scanned {url}"))
            assert shard_counts(urls[:1], tmp_path / "index.json") == [11]
        stream = TrainStream(urls, resolution=8, batch_size=2, mode="finite", counts=[11, 4], shuffle_buffer=0,
                             retries=1)
        with caplog.at_level("WARNING"):
            batches = list(stream)
        assert len(batches) == len(stream) == 7
        assert {k for b in batches for k in b["key"]} >= {"001_gray", "009_palette"}
        totals = {k: sum(b["data_stats"][k] for b in batches) for k in batches[0]["data_stats"]}
        assert totals["failed_shards"] == 1 and f"shard {urls[1]} failed" in caplog.text
    finally:
        server.shutdown()
