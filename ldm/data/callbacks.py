"""Sum the data pipeline's counts over ranks, log them, and stop a run that is losing too much data.

The counts are made in DataLoader worker processes, so they travel with each
batch ("data_stats", see ldm.data.pipeline). Every rank sees the same number of
training batches, so summing across ranks every few batches is a collective
that all ranks reach together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.data.decode import STAT_KEYS

log = logging.getLogger(__name__)


class DataStatsCallback(pl.Callback):
    """Logs `data/<count>` (totals over ranks since the start), `data/skip_fraction` and, with aspect
    buckets, `data/bucket_<H>x<W>` (that bucket's share of the samples batched).

    Raises when more than `max_skip_fraction` of the samples read were skipped
    (undecodable, or lost with a shard), once at least `min_samples` were read.
    All ranks see the same summed numbers, so they stop together instead of
    leaving one waiting at a collective.
    """

    def __init__(self, max_skip_fraction: float = 0.1, every_n_batches: int = 50, min_samples: int = 200,
                 buckets: Sequence[str] = ()) -> None:
        self.max_skip_fraction = max_skip_fraction
        self.every_n_batches = every_n_batches
        self.min_samples = min_samples
        # aspect buckets (names bucket_<H>x<W>): a fixed list, so every rank reduces the same-length vector
        self.buckets = list(buckets)
        self.keys = (*STAT_KEYS, *self.buckets)
        self.pending = torch.zeros(len(self.keys), dtype=torch.int64)
        self.totals = {key: 0 for key in self.keys}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = batch.get("data_stats") if isinstance(batch, dict) else None
        if stats:
            self.pending += torch.tensor([int(stats.get(key, 0)) for key in self.keys], dtype=torch.int64)
        last = batch_idx + 1 >= trainer.num_training_batches
        if (batch_idx + 1) % self.every_n_batches == 0 or last:
            self.sync(trainer, pl_module)

    def sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
        """Add the counts of all ranks since the last call to the totals, log them, check the limit."""
        # On the strategy's device (what NCCL takes), whatever device the module sits on when this is called.
        summed = trainer.strategy.reduce(self.pending.clone().to(trainer.strategy.root_device), reduce_op="sum").cpu()
        self.pending.zero_()
        for key, value in zip(self.keys, summed.tolist(), strict=True):
            self.totals[key] += int(value)
        read = self.totals["samples"]
        fraction = self.totals["skipped"] / read if read else 0.0
        metrics = {f"data/{key}": float(self.totals[key]) for key in STAT_KEYS}
        metrics["data/skip_fraction"] = fraction
        in_buckets = sum(self.totals[key] for key in self.buckets)
        for key in self.buckets:  # each bucket's share of the samples batched so far, over all ranks
            metrics[f"data/{key}"] = self.totals[key] / in_buckets if in_buckets else 0.0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        if read >= self.min_samples and fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{self.totals['skipped']} of {read} samples read ({fraction:.1%}) could not be used "
                f"(undecodable or in a failed shard), more than data.max_skip_fraction="
                f"{self.max_skip_fraction}; see the warnings above for which ones"
            )
        return dict(self.totals)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update(state_dict.get("totals", {}))
