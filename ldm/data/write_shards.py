"""Turn an image folder or a CSV/JSONL list of (image path, caption) into shards in img2dataset's layout.

    python -m ldm.data.write_shards --images photos/ --out data/mine --shard-size 10000 --processes 8
    python -m ldm.data.write_shards --list pairs.csv --out data/mine     # columns: path (or image), caption

With `--images`, the caption of `photos/a/cat.jpg` is `photos/a/cat.txt` when it
exists. Output is `00000.tar, 00001.tar, ...` holding `{key}.{jpg|png|webp}`,
`{key}.txt` and `{key}.json` (key = 9-digit sample index), and beside each shard
`{shard}_stats.json` with its sample count ("successes"), which the data module
reads so a finite epoch needs no scan. Image bytes are copied as they are (no
re-encoding, so no quality loss) after PIL has checked they decode; those that
do not are counted as failed and left out. Same input, same shards, byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ldm.data.shards import IMAGE_EXTENSIONS

Item = tuple[str, str | None]  # (image path, caption or None)

_PATH_COLUMNS = ("path", "image", "file", "filepath", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")


def _pick(row: dict[str, Any], names: Sequence[str], what: str, source: Path) -> Any:
    for name in names:
        if name in row:
            return row[name]
    if what == "caption":
        return None
    raise ValueError(f"{source}: no {what} column (looked for {', '.join(names)}); found {sorted(row)}")


def items_from_folder(folder: str | Path) -> list[Item]:
    """Every image under `folder` (sorted, recursive) with the text of a same-named .txt beside it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_text(encoding="utf-8", errors="replace") if caption_path.is_file() else None
        items.append((str(path), caption))
    if not items:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    return items


def items_from_list(list_file: str | Path) -> list[Item]:
    """(path, caption) rows of a CSV (with a header) or JSONL file; relative paths are relative to the file."""
    source = Path(list_file)
    if not source.is_file():
        raise FileNotFoundError(f"list file not found: {source}")
    if source.suffix.lower() in (".jsonl", ".ndjson"):
        with source.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with source.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    items = []
    for row in rows:
        path = Path(str(_pick(row, _PATH_COLUMNS, "image path", source)))
        caption = _pick(row, _CAPTION_COLUMNS, "caption", source)
        items.append((str(path if path.is_absolute() else source.parent / path), caption))
    if not items:
        raise ValueError(f"{source} lists no images")
    return items


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add bytes with fixed metadata, so equal input gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _probe(data: bytes) -> tuple[str, int, int]:
    """(extension, width, height) of an image that PIL fully decodes; raises otherwise."""
    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "").lower()
        image.load()
        width, height = image.size
    ext = {"jpeg": "jpg", "mpo": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if ext is None:
        raise ValueError(f"unsupported image format {fmt!r} (want {'/'.join(IMAGE_EXTENSIONS)})")
    return ext, width, height


def write_shard(out: str | Path, shard_index: int, first_key: int, items: Sequence[Item]) -> dict[str, Any]:
    """Write `{shard_index:05d}.tar` and its `_stats.json`; returns the stats (successes = samples written)."""
    out = Path(out)
    path = out / f"{shard_index:05d}.tar"
    tmp = path.with_name(f".{path.name}.tmp")
    start = time.time()
    successes, failures = 0, []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (image_path, caption) in enumerate(items):
            key = f"{first_key + offset:09d}"
            try:
                data = Path(image_path).read_bytes()
                ext, width, height = _probe(data)
            except Exception as exn:  # unreadable or undecodable: leave it out, say which
                failures.append(f"{image_path}: {exn!r}")
                continue
            meta = {"key": key, "status": "success", "caption": caption, "source": image_path,
                    "width": width, "height": height, "original_width": width, "original_height": height}
            _member(tar, f"{key}.{ext}", data)
            if caption is not None:
                _member(tar, f"{key}.txt", caption.strip().encode("utf-8"))
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            successes += 1
    os.replace(tmp, path)
    stats = {"count": len(items), "successes": successes, "failed_to_decode": len(failures),
             "errors": failures[:20], "start_time": start, "end_time": time.time()}
    (out / f"{shard_index:05d}_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _write_job(job: tuple[str, int, int, list[Item]]) -> dict[str, Any]:
    return write_shard(*job)


def write_shards(
    items: Sequence[Item], out: str | Path, shard_size: int = 10000, processes: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Write all items as shards of `shard_size` samples using `processes` worker processes."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.tar"))
    if stale:
        raise FileExistsError(f"{out} already holds shards ({stale[0].name}, ...); choose an empty directory")
    jobs = [(str(out), i, start, list(items[start : start + shard_size]))
            for i, start in enumerate(range(0, len(items), shard_size))]
    bar = tqdm(total=len(items), unit="img", desc="writing shards", disable=not progress)
    results: list[dict[str, Any]] = []

    def done(stats: dict[str, Any]) -> None:
        results.append(stats)
        bar.update(stats["count"])
        bar.set_postfix(failed=sum(r["failed_to_decode"] for r in results))

    if processes == 1 or len(jobs) == 1:
        for job in jobs:
            done(_write_job(job))
    else:
        with get_context("spawn" if sys.platform != "linux" else "fork").Pool(processes) as pool:
            for stats in pool.imap_unordered(_write_job, jobs):
                done(stats)
    bar.close()
    return {"shards": len(jobs), "samples": sum(r["successes"] for r in results),
            "failed": sum(r["failed_to_decode"] for r in results), "out": str(out)}


def _iter_errors(out: Path) -> Iterator[str]:
    for stats_file in sorted(out.glob("*_stats.json")):
        yield from json.loads(stats_file.read_text()).get("errors", [])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; prints a summary and the first few failures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (with optional same-named .txt captions)")
    source.add_argument("--list", help="CSV (header: path,caption) or JSONL ({'path':..., 'caption':...})")
    parser.add_argument("--out", required=True, help="output folder for 00000.tar, 00000_stats.json, ...")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    parser.add_argument("--processes", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    items = items_from_folder(args.images) if args.images else items_from_list(args.list)
    summary = write_shards(items, args.out, args.shard_size, args.processes, progress=not args.no_progress)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['out']} "
          f"({summary['failed']} images could not be decoded and were left out)")
    for error in list(_iter_errors(Path(args.out)))[:5]:
        print(f"  failed: {error}")
    last = summary["shards"] - 1
    print(f"train on them: python train.py data=webdataset data.train_shards='{summary['out']}/"
          f"{{00000..{last:05d}}}.tar' data.val_shards=...")
    return summary


if __name__ == "__main__":
    main()
