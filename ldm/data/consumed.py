"""What training consumed: each consumer's position for checkpoints, and an opt-in log of the keys per step.

The DataLoader workers run ahead of training, so a position is taken from the
batches that actually reached `on_train_batch_end`, never from the stream. Every
batch carries its consumer's `data_position` ({"consumer", "cursor", "held"},
see ldm.data.pipeline.TrainStream); this rank's latest one per consumer, with
the number of its batches trained this epoch, is what ShardDataModule.state_dict
gathers over ranks into the checkpoint.

With `data.consumed_log=DIR` each rank appends one JSON line per training batch
to DIR/rank<r>.jsonl: {"step", "epoch", "rank", "batch", "keys", "time"}, flushed
at once so a crash loses nothing written. A resumed run first writes
{"resume": step, "time"}: lines of earlier runs after that step were trained
again and do not count (`python -m ldm.data.coverage DIR` applies that rule).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl


class ConsumedCallback(pl.Callback):
    """Latest trained position per consumer of this rank; optionally the keys log."""

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        self.positions: dict[int, list[Any]] = {}  # consumer -> [cursor, batches trained, held]
        self._file: IO[str] | None = None

    def _reset(self, trainer: pl.Trainer) -> None:
        datamodule = trainer.datamodule
        starts = getattr(datamodule, "start_positions", None)
        self.positions = starts(trainer.current_epoch) if starts is not None else {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        align = getattr(trainer.datamodule, "align_progress", None)
        if align is not None:
            align()
        self._reset(trainer)
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(self.log_dir) / f"rank{trainer.global_rank}.jsonl", "a")  # noqa: SIM115
            if trainer.global_step > 0:
                self._write({"resume": trainer.global_step, "epoch": trainer.current_epoch,
                             "rank": trainer.global_rank})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            return
        position = batch.get("data_position")
        if position is not None:
            entry = self.positions.setdefault(int(position["consumer"]), [0, 0, []])
            entry[0], entry[1], entry[2] = int(position["cursor"]), entry[1] + 1, list(position["held"])
        if self._file is not None:
            self._write({"step": trainer.global_step, "epoch": trainer.current_epoch, "rank": trainer.global_rank,
                         "batch": batch_idx, "keys": list(batch.get("key", []))})

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        record["time"] = time.time()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
