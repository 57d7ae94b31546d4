"""What each rank's training loader yields with aspect buckets: batch counts, one shape per batch, histogram.

    python -m ldm.data.bucket_report --shards data/wide/train --buckets '[[16,24],[16,16],[24,16]]' \
        --resolution 16 --batch-size 8 --world-size 2 --num-workers 2

Every rank's stream is built by the data module exactly as training builds it and read
for one epoch through a DataLoader with the given workers. Exits with status 1 when a
batch holds more than one shape or the ranks' batch counts differ (DDP would hang).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from tqdm import tqdm

from ldm.data.datamodule import ShardDataModule


class _RankModule(ShardDataModule):
    """The data module as rank `rank` of `world_size` sees it, without a trainer or process group."""

    def __init__(self, rank: int, world_size: int, **kwargs: Any) -> None:
        self._at = (rank, world_size)
        super().__init__(**kwargs)

    def _rank_world(self) -> tuple[int, int]:
        return self._at


def report(world_size: int, epoch: int = 0, progress: bool = True, **data: Any) -> dict[str, Any]:
    """{"batches": [count per rank], "mixed": batches with several shapes, "histogram": {HxW: samples}}."""
    histogram: Counter[str] = Counter()
    batches, mixed = [], 0
    for rank in range(world_size):
        module = _RankModule(rank, world_size, val_shards=None, **data)
        module.setup("fit")
        assert module.train_set is not None
        module.train_set.set_epoch(epoch)
        count = 0
        for batch in tqdm(module.train_dataloader(), desc=f"rank {rank}", disable=not progress, leave=False):
            field = batch["image"] if "image" in batch else batch["moments"]
            shapes = {tuple(x.shape[1:]) for x in field}
            mixed += len(shapes) > 1
            for h, w in shapes:
                histogram[f"{h}x{w}"] += len(field)
            count += 1
        batches.append(count)
    return {"batches": batches, "mixed": mixed, "histogram": dict(sorted(histogram.items()))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: prints the report, exit status 1 if a batch mixed shapes or ranks differ."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="training shards: folder, brace pattern or URL")
    parser.add_argument("--buckets", type=json.loads, required=True, help="data.buckets as JSON")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--mode", default="finite", choices=("finite", "resampled"))
    parser.add_argument("--epoch-length", type=int, default=None, help="resampled mode: batches per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--latents", action="store_true", help="latent shards (grouped by their stored shape)")
    args = parser.parse_args(argv)
    result = report(args.world_size, args.epoch, train_shards=args.shards, buckets=args.buckets,
                    resolution=args.resolution, batch_size=args.batch_size, num_workers=args.num_workers,
                    mode=args.mode, epoch_length=args.epoch_length, seed=args.seed, latents=args.latents)
    total = sum(result["histogram"].values())
    print(f"bucket histogram (samples in batches, epoch {args.epoch}, all ranks):")
    for name, n in result["histogram"].items():
        print(f"  {name:>9}: {n:6d}  {n / total:6.1%}")
    for rank, count in enumerate(result["batches"]):
        print(f"rank {rank}: {count} batches")
    print(f"batches holding more than one shape: {result['mixed']}")
    if result["mixed"] or len(set(result["batches"])) > 1:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
