"""WebDataset streams of (image, caption) batches for training and validation.

Shards are tars in img2dataset's layout (`{key}.jpg|png|webp`, `{key}.txt`, ...).
Each stream is read by a number of *consumers*: every DataLoader worker of
every DDP rank. Shards are dealt round-robin to consumers; when there are fewer
shards than consumers, every consumer reads every shard and keeps every n-th
sample, so the parts stay disjoint and complete either way.

Training is an endless resampled stream per consumer cut into epochs of a fixed
number of batches, so every rank takes the same number of optimizer steps (an
uneven count hangs DDP at the next collective). Validation is one finite,
ordered pass.

Only image members are decoded, by PIL; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ShardSpec = str | Path | Sequence[str | Path]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


# ---------------------------------------------------------------------------------------------
# Shard lists


def _is_local(url: str) -> bool:
    return not url.startswith(_REMOTE_PREFIXES)


def expand_shards(spec: ShardSpec) -> list[str]:
    """Turn a brace pattern, a directory of .tar files, or a list of those into shard paths.

    Local shards are checked here, so a typo fails when the data set is built rather
    than inside a DataLoader worker mid-epoch.
    """
    if isinstance(spec, (str, Path)):
        specs = [spec]
    else:
        specs = list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if _is_local(item) and Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory {item}")
            urls += found
        else:
            urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    for url in urls:
        path = url[len("file:") :] if url.startswith("file:") else url
        if _is_local(url) and not Path(path).is_file():
            raise FileNotFoundError(f"shard not found: {path}")
    return urls


@lru_cache(maxsize=64)
def _read_json_cached(path: str, mtime_ns: int) -> Any:
    return json.loads(Path(path).read_text())


def _read_json(path: str) -> Any:
    """Parse a JSON file once per version of it (info.json is consulted for every shard)."""
    return _read_json_cached(path, Path(path).stat().st_mtime_ns)


def _shard_count(url: str) -> int | None:
    """Samples in one local shard from img2dataset's `{shard}_stats.json` or our `info.json`."""
    if not _is_local(url):
        return None
    shard = Path(url).resolve()
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        if stats.is_file():
            return int(_read_json(str(stats))["successes"])
        for root in (shard.parent, shard.parent.parent):
            info_path = root / "info.json"
            if not info_path.is_file():
                continue
            for split in _read_json(str(info_path)).get("splits", {}).values():
                for entry in split.get("shards", []):
                    if (root / entry["path"]).resolve() == shard:
                        return int(entry["num_samples"])
    except (OSError, ValueError, KeyError, TypeError) as exn:
        log.warning("could not read the sample count of %s: %r", url, exn)
    return None


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples in the shards if every shard's count is recorded next to it, else None."""
    total = 0
    for url in urls:
        count = _shard_count(url)
        if count is None:
            return None
        total += count
    return total


# ---------------------------------------------------------------------------------------------
# Decoding


class SkipCounter:
    """Exception handler that skips a bad shard or sample, counts it and says so.

    Counts are per process (each DataLoader worker has its own copy).
    """

    def __init__(self, what: str = "sample") -> None:
        self.what = what
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("skipped a %s (%d so far in this process): %r", self.what, self.count, exn)
        return True


class _KeepMembers:
    """Tar member filter: read only images and the caption, never other payloads."""

    def __init__(self, caption_key: str) -> None:
        self.extensions = {*IMAGE_EXTENSIONS, caption_key.lower()}

    def __call__(self, fname: str) -> bool:
        name = fname.rsplit("/", 1)[-1]
        return "." in name and name.split(".", 1)[1].lower() in self.extensions


def load_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> RGB, shorter side resized to `resolution`, centre crop -> 3xRxR in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced scale when much larger
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.array(image, dtype=np.uint8))
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_sample(sample: dict[str, Any], resolution: int, caption_key: str = "txt") -> dict[str, Any]:
    """Raw tar sample (bytes per extension) -> {"image", "caption", "key"}; no image is an error."""
    fields = {key.lower(): value for key, value in sample.items()}
    data = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    caption = fields.get(caption_key.lower(), b"")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return {
        "image": load_image(data, resolution),
        "caption": caption.strip(),
        "key": sample.get("__key__", ""),
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> {"image": Bx3xRxR, "caption": [str], "key": [str]}."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


# ---------------------------------------------------------------------------------------------
# Splitting across ranks and workers


def consumer(rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all ranks."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


def assign_shards(urls: Sequence[str], index: int, count: int) -> tuple[list[str], int, int]:
    """This consumer's shards and the sample stride/offset it keeps within each.

    Enough shards: deal them round-robin, keep every sample. Too few: read all of
    them, keep sample i when i % count == index.
    """
    if len(urls) >= count:
        return list(urls[index::count]), 1, 0
    return list(urls), count, index


def _read_shards(
    urls: Sequence[str], stride: int, offset: int, handler: SkipCounter, keep: _KeepMembers
) -> Iterator[dict]:
    """Raw samples of the given shards in order, keeping every `stride`-th one from `offset`."""
    for url in urls:
        samples = wds.tarfile_samples([{"url": url}], handler=handler, select_files=keep)
        for i, sample in enumerate(samples):
            if i % stride == offset:
                yield sample


def _resampled_shards(
    urls: Sequence[str],
    stride: int,
    offset: int,
    handler: SkipCounter,
    keep: _KeepMembers,
    rng: random.Random,
) -> Iterator[dict]:
    """Endless raw samples: passes over the shards, each pass in a new random order."""
    while True:
        order = list(urls)
        rng.shuffle(order)
        yielded = 0
        for sample in _read_shards(order, stride, offset, handler, keep):
            yielded += 1
            yield sample
        if yielded == 0:
            raise RuntimeError(f"a full pass over {len(order)} shards gave no samples (first: {order[0]})")


class _DecodeGuard:
    """Decode map that fails loudly when nothing at all decodes, instead of spinning forever."""

    def __init__(self, resolution: int, caption_key: str, handler: SkipCounter) -> None:
        self.resolution = resolution
        self.caption_key = caption_key
        self.handler = handler
        self.decoded = 0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        try:
            result = decode_sample(sample, self.resolution, self.caption_key)
        except Exception as exn:
            self.handler(exn)
            if self.decoded == 0 and self.handler.count >= 100:
                raise RuntimeError(f"the first {self.handler.count} samples all failed to decode") from exn
            return None
        self.decoded += 1
        return result


# ---------------------------------------------------------------------------------------------
# Datasets


class TrainStream(IterableDataset):
    """Shuffled, endless batches; each epoch is exactly `epoch_length` batches on this rank.

    The epoch's batches are divided between DataLoader workers (the first
    `epoch_length % num_workers` workers give one more), so the DataLoader yields
    exactly `epoch_length` per epoch with any worker count. The underlying stream
    lives on in each worker across epochs (use persistent workers), so epochs
    continue the data rather than replay it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        resolution: int,
        batch_size: int,
        epoch_length: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        caption_key: str = "txt",
    ) -> None:
        super().__init__()
        if epoch_length < 1 or batch_size < 1:
            raise ValueError(f"epoch_length and batch_size must be >= 1, got {epoch_length}, {batch_size}")
        self.urls = list(urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.epoch_length = epoch_length
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.caption_key = caption_key
        self._batches: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self.epoch_length

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_batches"] = None  # a live generator stays in the process that made it
        return state

    def _stream(self) -> Iterator[dict[str, Any]]:
        index, count = consumer(self.rank, self.world_size)
        urls, stride, offset = assign_shards(self.urls, index, count)
        rng = random.Random(f"train:{self.seed}:{index}:{count}")
        handler = SkipCounter()
        source = partial(
            _resampled_shards, urls, stride, offset, handler, _KeepMembers(self.caption_key), rng
        )
        pipeline = wds.DataPipeline(
            source,
            wds.map(_DecodeGuard(self.resolution, self.caption_key, handler)),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
            if self.shuffle_buffer > 1
            else None,
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self.epoch_length // num_workers + (worker < self.epoch_length % num_workers)
        if self._batches is None:
            self._batches = self._stream()
        for _ in range(share):
            yield next(self._batches)


class ValStream(IterableDataset):
    """One ordered pass over this rank's part of the shards, in batches (the last ones partial).

    Ranks read disjoint parts that together cover every sample once, but their
    batch counts can differ by a few when shards or samples don't divide evenly.
    That is harmless as long as validation steps do no collectives (log with
    sync_dist only at epoch end). TODO: pad to an equal count per rank.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        resolution: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        caption_key: str = "txt",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.caption_key = caption_key

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, count = consumer(self.rank, self.world_size)
        urls, stride, offset = assign_shards(self.urls, index, count)
        handler = SkipCounter()
        pipeline = wds.DataPipeline(
            partial(_read_shards, urls, stride, offset, handler, _KeepMembers(self.caption_key)),
            wds.map(_DecodeGuard(self.resolution, self.caption_key, handler)),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        )
        yield from pipeline
