"""Throughput and input-pipeline health, logged with the losses: images/s, samples seen, data-wait share.

Timing uses host clocks only (no device synchronisation, no `.item()`), so it never stalls the step: on a GPU
the step time is the time between batch hand-outs, which averages to the true rate over the logging window.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    def __init__(self, log_every_n_steps: int = 50):
        self.every = max(1, int(log_every_n_steps))
        self.samples_seen = 0
        self._reset_window()
        self._batch_end: float | None = None

    def _reset_window(self) -> None:
        self._window_images = 0
        self._window_batches = 0
        self._window_wait = 0.0
        self._window_start: float | None = None

    @staticmethod
    def _batch_size(batch: Any) -> int:
        if isinstance(batch, dict):
            for value in batch.values():
                if hasattr(value, "shape"):
                    return int(value.shape[0])
        return 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start = now
        elif self._batch_end is not None:
            self._window_wait += now - self._batch_end  # the loop waited this long for the next batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        images = self._batch_size(batch) * trainer.world_size
        self.samples_seen += images
        self._window_images += images
        self._window_batches += 1
        self._batch_end = now
        if self._window_batches < self.every:
            return
        elapsed = now - (self._window_start or now)
        if elapsed > 0:
            pl_module.log_dict({"perf/images_per_sec": self._window_images / elapsed,
                                "perf/data_wait_fraction": self._window_wait / elapsed,
                                "perf/samples_seen": float(self.samples_seen)}, batch_size=1, rank_zero_only=True)
        self._reset_window()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_end = None  # validation time is not time spent waiting for training data
        self._reset_window()

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))
