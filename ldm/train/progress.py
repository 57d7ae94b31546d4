"""The progress bar, showing the training loss without a host read per step.

Lightning converts every `prog_bar=True` value to a Python number after every step, whether the bar redraws or
not: on a GPU, one synchronisation per step. The modules log their loss without prog_bar, and this bar reads it
from the callback metrics only when it redraws (every `refresh_rate` steps, with the loggers by default).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

LOSS_KEYS = ("train/loss", "loss")  # stage=ldm, stage=vae


class LossProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        for key in LOSS_KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None and getattr(value, "numel", lambda: 0)() == 1:
                metrics["loss"] = f"{float(value):.4g}"  # the one read, at a redraw
                break
        return metrics
