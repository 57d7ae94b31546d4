"""Loader images/s per worker: the framework's training stream against a bare tarfile + PIL loop.

Both read the same JPEG shards in the same process and produce the same thing
(batches of 3xRxR float tensors in [-1, 1], shorter side resized then centre
crop); the bare loop has no shuffle buffer, counting, skipping or captions. Runs
alternate (framework, bare, framework, ...) so machine load hits both alike; the
median ratio of each pair is what the pipeline costs on top of decoding (goal >= 0.9).

    OMP_NUM_THREADS=1 python bench/loader_speed.py                 # writes temporary shards
    OMP_NUM_THREADS=1 python bench/loader_speed.py --shards '/data/{00000..00003}.tar' --resolution 256
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.pipeline import TrainStream, expand_shards, shard_counts


def write_jpeg_shards(out: Path, num: int, shards: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus grain) with captions, in img2dataset layout."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-num // shards)
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(num, (s + 1) * per_shard)):
                coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
                grain = rng.integers(-12, 13, (size[1], size[0], 3))
                image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return expand_shards(out)


def bare_loop(urls: list[str], resolution: int, batch_size: int) -> int:
    """The baseline: tarfile + PIL decode + resize + centre crop + tensor, nothing else. Returns images."""
    images, batch = 0, []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    image.draft("RGB", (resolution, resolution))
                    image = image.convert("RGB")
                width, height = image.size
                scale = resolution / min(width, height)
                size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
                left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
                image = image.crop((left, top, left + resolution, top + resolution))
                array = torch.from_numpy(np.array(image, dtype=np.uint8))
                batch.append(array.permute(2, 0, 1).float().div_(127.5).sub_(1.0))
                if len(batch) == batch_size:
                    torch.stack(batch)
                    images += len(batch)
                    batch = []
    return images


def framework_loop(stream: TrainStream, epoch: int) -> int:
    """One finite epoch of the training stream, in this process (= one DataLoader worker's work)."""
    stream.set_epoch(epoch)
    return sum(len(batch["key"]) for batch in stream)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="existing shards (brace pattern / folder); default: write temporary ones")
    parser.add_argument("--num", type=int, default=1024, help="images to write when --shards is not given")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 288), help="written images' W H")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            urls = expand_shards(args.shards)
        else:
            urls = write_jpeg_shards(Path(tmp), args.num, 4, tuple(args.image_size))
        stream = TrainStream(urls, resolution=args.resolution, batch_size=args.batch_size, mode="finite",
                             counts=shard_counts(urls, Path(tmp) / "index.json"),
                             shuffle_buffer=args.shuffle_buffer)
        bare_loop(urls, args.resolution, args.batch_size)  # warm the page cache and PIL
        rates: dict[str, list[float]] = {"framework": [], "bare": []}
        for repeat in range(args.repeats):
            for name in ("framework", "bare"):
                start = time.perf_counter()
                if name == "framework":
                    n = framework_loop(stream, repeat)
                else:
                    n = bare_loop(urls, args.resolution, args.batch_size)
                rates[name].append(n / (time.perf_counter() - start))
    result = {name: statistics.median(values) for name, values in rates.items()}
    # each framework run against the bare run right after it: robust to load that drifts during the benchmark
    result["ratio"] = statistics.median(f / b for f, b in zip(rates["framework"], rates["bare"], strict=True))
    print(f"{len(urls)} shards, {args.resolution}px, batch {args.batch_size}, shuffle buffer "
          f"{args.shuffle_buffer}, {args.repeats} interleaved repeats, one process")
    for name in ("framework", "bare"):
        print(f"  {name:9s} {result[name]:8.1f} images/s   (runs: {', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"  ratio     {result['ratio']:8.3f}   (median of paired framework / bare runs; goal >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "runs": rates, "args": vars(args)}, indent=2))
    return result


if __name__ == "__main__":
    main()
