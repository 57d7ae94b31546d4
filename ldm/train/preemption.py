"""The SLURM requeue signal, acted on by all ranks together at one step boundary.

SLURM sends USR1 (`--signal=USR1@90`, `scancel -s USR1`) to every rank, each at its own point of a step. The
handler only sets a flag (ldm/train/signals.py). Once per logging window (`trainer.log_every_n_steps`
optimizer steps, counted by the global step, which every rank shares) the ranks all-reduce that flag: one
one-element tensor on the strategy's root device and one host read per window, never one per step. When any
rank has it, every rank saves at that same step (Lightning's `hpc_ckpt_N.ckpt` in the run directory, which
`ckpt=auto` and a requeued job resume from), the trainer process of rank 0 runs `scontrol requeue` once, and
training stops (`PreemptedForRequeue`: no final validation, no export). The save therefore happens up to one
window after the signal: `--signal=USR1@<seconds>` must cover that many steps and a save.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException


class PreemptedForRequeue(SIGTERMException):
    """Training stopped after the requeue save: Lightning's clean-stop path (exit status 0), as for SIGTERM."""


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: ARRAY_TASK for an array job's task, else the job id."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue(job: str) -> int:
    """`scontrol requeue JOB`, as Lightning runs it; returns its exit status."""
    try:
        return subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:  # not on PATH outside a login shell
        return subprocess.call(f"scontrol requeue {job}", shell=True)


class PreemptionCheckpoint(pl.Callback):
    """On SLURM's requeue signal: agree across ranks at a window boundary, save there, requeue, stop."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = max(int(every_n_steps), 1)
        self._window = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = trainer.global_step // self.every_n_steps  # a resumed run checks at its next boundary

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        window = trainer.global_step // self.every_n_steps  # the same on every rank, so all of them check
        if window == self._window:
            return  # inside a window, or between micro-batches of one accumulated step
        self._window = window
        if self._agreed(trainer):
            self._save_requeue_stop(trainer)

    @staticmethod
    def _agreed(trainer: pl.Trainer) -> bool:
        """Whether any rank got the requeue signal: one MAX all-reduce, whatever the flags."""
        connector = trainer._signal_connector
        requested = bool(getattr(connector, "requeue_requested", False))
        if trainer.world_size == 1:
            return requested
        flag = torch.tensor([int(requested)], dtype=torch.int32, device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max").item())  # the one host read per window

    @staticmethod
    def _save_requeue_stop(trainer: pl.Trainer) -> None:
        connector = trainer._signal_connector
        connector.stopping_for_requeue = True
        step = trainer.global_step
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        print(f"[ldm] rank {trainer.global_rank}: requeue signal agreed at step {step}; saving"
              + (f" {path}" if trainer.is_global_zero else ""), flush=True)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)  # every rank, at this step; written by rank 0, ends in a barrier
        if trainer.is_global_zero:
            job = slurm_job_id()
            if job is None:
                print("[ldm] warning: no SLURM job id to requeue", flush=True)
            else:
                result = requeue(job)
                print(f"[ldm] scontrol requeue {job}: " + ("requeued" if result == 0 else f"failed ({result})"),
                      flush=True)
        raise PreemptedForRequeue
