"""Shard sources: expand shard specs, know how many samples each holds, read samples out of them.

A shard is a tar in img2dataset's layout: members `{key}.{ext}` grouped by key,
e.g. `000000123.jpg`, `000000123.txt`, `000000123.json`. Reading is done here
with `tarfile` in streaming mode so that only the members the pipeline asks for
are ever read into memory; everything else (`.pyd`, `.pickle`, ...) is skipped
as bytes and never deserialised.

Sample counts come, in order of preference, from img2dataset's
`{shard}_stats.json`, from an `info.json` beside the shards (our shapes data),
or from a one-time scan that is cached in an index file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import braceexpand

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ShardSpec = str | Path | Sequence[str | Path]
Sample = dict[str, Any]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


def is_local(url: str) -> bool:
    """True for a plain path (or file: URL); False for anything opened by a command or over the network."""
    return not url.startswith(_REMOTE_PREFIXES)


def _local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") else url


def expand_shards(spec: ShardSpec) -> list[str]:
    """Turn a brace pattern, a directory of .tar files, a URL, or a list of those into shard URLs.

    Local shards are checked here, so a typo fails when the data set is built rather
    than inside a DataLoader worker mid-epoch.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if is_local(item) and Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory {item}")
            urls += found
        else:
            urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    for url in urls:
        if is_local(url) and not Path(_local_path(url)).is_file():
            raise FileNotFoundError(f"shard not found: {_local_path(url)}")
    return urls


def expand_sources(spec: Any) -> list[tuple[list[str], float]]:
    """[(shard URLs, weight)] from a shard spec, or from a list of {"shards": spec, "weight": w} to mix sources."""
    items = [spec] if isinstance(spec, (str, Path, Mapping)) else list(spec)
    if not any(isinstance(item, Mapping) for item in items):
        return [(expand_shards(spec), 1.0)]
    sources = []
    for item in items:
        if not isinstance(item, Mapping) or "shards" not in item:
            raise ValueError(f"a mixed shard source must be {{shards: ..., weight: ...}}, got {item!r}")
        weight = float(item.get("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"source weight must be > 0, got {weight} for {item['shards']!r}")
        sources.append((expand_shards(item["shards"]), weight))
    return sources


# ---------------------------------------------------------------------------------------------
# Reading


def _open(url: str) -> IO[bytes]:
    if is_local(url):
        return open(_local_path(url), "rb")
    import webdataset as wds  # its gopen knows pipe:, http(s) (curl), s3/gs via their CLIs

    return wds.gopen(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`): the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _tar_groups(stream: IO[bytes], keep: Callable[[str], bool]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every key with at least one kept member; other members are skipped unread."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_name(info.name)
            if member_key != key:
                if key is not None and fields:
                    yield key, fields
                key, fields = member_key, {}
            if ext and keep(ext):
                handle = tar.extractfile(info)
                fields[ext] = handle.read() if handle is not None else b""
    if key is not None and fields:
        yield key, fields


def read_samples(
    url: str,
    keep: Callable[[str], bool],
    *,
    start: int = 0,
    stop: int | None = None,
    stride: int = 1,
    offset: int = 0,
    retries: int = 2,
    on_failure: Callable[[str, int, Exception], None] | None = None,
) -> Iterator[Sample]:
    """Samples `start <= i < stop` of one shard (keeping those with `i % stride == offset`).

    A remote shard that fails is reopened `retries` times (continuing after the
    samples already read); after that, or at once for a local file, the failure
    is reported by name through `on_failure(url, position, exception)` and the
    shard ends early. Nothing here decodes payloads.
    """
    position = 0  # index of the next sample to read
    attempts = 0 if is_local(url) else retries
    while True:
        try:
            stream = _open(url)
            try:
                for index, (key, fields) in enumerate(_tar_groups(stream, keep)):
                    if index < max(position, start):
                        continue
                    if stop is not None and index >= stop:
                        return
                    position = index + 1
                    if index % stride == offset:
                        yield {"__key__": key, "__url__": url, **fields}
                return
            finally:
                try:
                    stream.close()
                except Exception:  # a pipe closed early reports SIGPIPE; that is expected
                    pass
        except (OSError, tarfile.TarError, EOFError, ValueError) as exn:
            if attempts > 0:
                attempts -= 1
                log.warning("reading shard %s failed at sample %d (%r); retrying", url, position, exn)
                time.sleep(1.0)
                continue
            log.error("shard %s failed at sample %d and is skipped: %r", url, position, exn)
            if on_failure is not None:
                on_failure(url, max(position, start), exn)
            return


# ---------------------------------------------------------------------------------------------
# Sample counts


@lru_cache(maxsize=64)
def _read_json_cached(path: str, mtime_ns: int) -> Any:
    return json.loads(Path(path).read_text())


def _read_json(path: str) -> Any:
    """Parse a JSON file once per version of it (info.json is consulted for every shard)."""
    return _read_json_cached(path, Path(path).stat().st_mtime_ns)


def recorded_count(url: str) -> int | None:
    """Samples in one local shard from img2dataset's `{shard}_stats.json` or our `info.json`."""
    if not is_local(url):
        return None
    shard = Path(_local_path(url)).resolve()
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
        count = recorded_count(url)
        if count is None:
            return None
        total += count
    return total


def _is_payload(ext: str) -> bool:
    return ext in IMAGE_EXTENSIONS or ext == "moments.npy"  # an image, or precomputed latents


def scan_count(url: str) -> int:
    """Count the samples of a shard by reading it (image or latent members only are read into memory)."""
    failures: list[Exception] = []
    count = sum(1 for _ in read_samples(url, _is_payload, on_failure=lambda u, i, e: failures.append(e)))
    if failures:
        raise RuntimeError(f"could not scan shard {url}: {failures[0]!r}") from failures[0]
    return count


def _remote_stats_count(url: str, timeout: float = 10.0) -> int | None:
    """`successes` of `{shard}_stats.json` next to an http(s) shard, or None when there is none."""
    if not url.endswith(".tar"):
        return None
    try:
        with urllib.request.urlopen(url[: -len(".tar")] + "_stats.json", timeout=timeout) as response:
            return int(json.loads(response.read())["successes"])
    except Exception:  # no stats file, or unreadable: the shard gets scanned instead
        return None


def _signature(url: str) -> str:
    """What must not change for a cached count to stay valid: size and mtime of a local file."""
    if is_local(url):
        stat = os.stat(_local_path(url))
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return "remote"


def default_index_path(urls: Sequence[str]) -> Path:
    """Where scanned counts are cached: beside the first local shard if writable, else ~/.cache/ldm."""
    first = urls[0]
    if is_local(first):
        folder = Path(_local_path(first)).resolve().parent
        if os.access(folder, os.W_OK):
            return folder / "_ldm_index.json"
    digest = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm" / "shard_index"
    return cache / f"{digest}.json"


def shard_counts(urls: Sequence[str], index_file: str | Path | None = None) -> list[int]:
    """Samples per shard: recorded counts where present, the rest scanned once and cached in `index_file`."""
    counts: list[int | None] = [recorded_count(url) for url in urls]
    missing = [i for i, c in enumerate(counts) if c is None]
    if not missing:
        return [int(c) for c in counts]  # type: ignore[arg-type]
    path = Path(index_file) if index_file else default_index_path(urls)
    index: dict[str, Any] = {}
    if path.is_file():
        try:
            index = json.loads(path.read_text())
        except ValueError:
            log.warning("ignoring unreadable shard index %s", path)
    changed = False
    for i in missing:
        entry = index.get(urls[i])
        if entry is not None and entry.get("signature") == _signature(urls[i]):
            counts[i] = int(entry["num_samples"])
    remote = [i for i in missing if counts[i] is None and urls[i].startswith(("http://", "https://"))]
    if remote:  # img2dataset's _stats.json beside a remote shard is far cheaper than reading the shard
        with ThreadPoolExecutor(16) as pool:
            for i, count in zip(remote, pool.map(_remote_stats_count, [urls[i] for i in remote]), strict=True):
                if count is not None:
                    counts[i] = count
                    index[urls[i]] = {"signature": _signature(urls[i]), "num_samples": count}
                    changed = True
    for i in missing:
        if counts[i] is None:
            log.info("counting samples in %s (once; cached in %s)", urls[i], path)
            counts[i] = scan_count(urls[i])
            index[urls[i]] = {"signature": _signature(urls[i]), "num_samples": counts[i]}
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: ranks scanning at once never see half a file
    return [int(c) for c in counts]  # type: ignore[arg-type]
