"""The SLURM requeue signal, acted on by all ranks together at one step boundary.

SLURM sends USR1 (`--signal=USR1@90`, `scancel -s USR1`) to every rank, each at its own point of a step. The
handler only sets a flag (ldm/train/signals.py). Once per logging window (`trainer.log_every_n_steps`
optimizer steps, counted by the global step, which every rank shares) the ranks all-reduce that flag: one
one-element tensor on the strategy's root device and one host read per window, never one per step. When any
rank has it, every rank saves at that same step (Lightning's `hpc_ckpt_N.ckpt` in the run directory, which
`ckpt=auto` and a requeued job resume from), the trainer process of rank 0 runs `scontrol requeue` once, and
training stops (`PreemptedForRequeue`: no final validation, no export). The save therefore happens up to one
window after the signal: `--signal=USR1@<seconds>` must cover that many steps and a save.

SIGTERM (a time limit, `scancel`) rides on the same all-reduce. Lightning 2.6 instead broadcasts rank 0's
SIGTERM flag before every batch and reads it back (`_TrainingEpochLoop._broadcast_sigterm_tensor`): a
collective and a host read per step, the only ones left in our steps (bench/host_reads_ddp.py). That
broadcast is switched off here; the ranks agree on SIGTERM at the window boundary and all set
`received_sigterm` there, so Lightning's loops stop every rank after that same step (exit status 0). A
SIGTERM therefore stops training up to one window later; nothing is saved on SIGTERM, with or without the
delay (the periodic checkpoints and USR1 are what keep the work).
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
        if trainer.world_size > 1:
            quiet_per_step_sigterm_broadcast(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        window = trainer.global_step // self.every_n_steps  # the same on every rank, so all of them check
        if window == self._window:
            return  # inside a window, or between micro-batches of one accumulated step
        self._window = window
        requeue, terminate = self._agreed(trainer)
        if requeue:
            self._save_requeue_stop(trainer)
        if terminate:  # Lightning's epoch loop raises SIGTERMException after this batch, on every rank
            trainer._signal_connector.received_sigterm = True
            print(f"[ldm] rank {trainer.global_rank}: SIGTERM agreed at step {trainer.global_step}; stopping",
                  flush=True)

    @staticmethod
    def _agreed(trainer: pl.Trainer) -> tuple[bool, bool]:
        """Whether any rank got the requeue signal, and SIGTERM: one MAX all-reduce, whatever the flags."""
        connector = trainer._signal_connector
        flags = [bool(getattr(connector, "requeue_requested", False)),
                 bool(getattr(connector, "sigterm_requested", False))]
        if trainer.world_size == 1:
            return flags[0], flags[1]
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=trainer.strategy.root_device)
        requeue, terminate = trainer.strategy.reduce(tensor, reduce_op="max").tolist()  # one host read a window
        return bool(requeue), bool(terminate)

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


def quiet_per_step_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Switch off Lightning's broadcast of rank 0's SIGTERM flag before every batch (see the module docstring).

    A private method of Lightning's epoch loop, replaced on this trainer's instance only; tests/test_preemption.py
    fails if a Lightning upgrade renames it, and bench/host_reads_ddp.py shows a per-step read coming back.
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = _no_broadcast


def _no_broadcast() -> None:
    """SIGTERM is agreed by PreemptionCheckpoint once per window instead."""
