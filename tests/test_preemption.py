"""The requeue signal on 2 CPU ranks (gloo) with loader workers on, as srun starts them: one process per rank
with the job step's environment, a fake `scontrol` on PATH that records its calls and then SIGTERMs every rank
(what `scontrol requeue` does to a running job), and USR1 sent to each rank's process group (the rank and its
loader workers) at a different moment of training, as SLURM's signals reach the ranks of a job.

A save inside the signal handler ends in a collective that pairs with whatever the other rank is doing at that
moment (its gradient all-reduce, or its own handler's barrier): the run hangs, or saves twice, or goes on
training. The handler must only set a flag, and the ranks must agree on it at one step and save there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.train.run_dir import checkpoint_step

from .conftest import ROOT
from .test_end_to_end import USER_DATA
from .test_requeue import fake_slurm_env, steps_by_write_time, wait_for

WINDOW = 8  # trainer.log_every_n_steps: the ranks agree on the flag once per window


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(tmp_path: Path, args: list[str], restarts: int, tag: str) -> list[subprocess.Popen]:
    """Both ranks of a one-node, two-task job step; each in its own process group (with its loader workers)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = fake_slurm_env(tmp_path, restarts)
        env.update({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
                    "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port})
        log = open(tmp_path / f"{tag}-rank{rank}.log", "w")  # noqa: SIM115 - the child writes it
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                      start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def wait_for_ranks(what: str, predicate, timeout: float, procs: list[subprocess.Popen], tmp_path: Path, tag: str):
    """wait_for on rank 0 that, when a rank ends early, shows every rank's log (not only its exit code)."""
    try:
        wait_for(what, predicate, timeout, procs[0])
    except AssertionError as err:
        logs = "\n".join(f"--- rank {r} (exit {p.poll()}) ---\n{(tmp_path / f'{tag}-rank{r}.log').read_text()[-3000:]}"
                         for r, p in enumerate(procs))
        raise AssertionError(f"{err}\n{logs}") from None


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes after `timeout` seconds at most; a rank still running then is killed (None: it hung)."""
    deadline = time.time() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return codes


def two_rank_vae_args(tmp_path: Path, tiny_shapes: Path, run: Path) -> list[str]:
    """stage=vae on a user's shards, 2 DDP ranks, a checkpoint every 4 steps, flags agreed every WINDOW steps."""
    return ["stage=vae", "data=webdataset", *USER_DATA, f"data.train_shards={tiny_shapes}/train",
            f"data.val_shards={tiny_shapes}/val", f"paths.runs={tmp_path}/runs", f"paths.exports={tmp_path}/exports",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.devices=2",
            "trainer.strategy=ddp", f"trainer.log_every_n_steps={WINDOW}", "checkpoint.every_n_train_steps=4",
            "faults.collective_timeout_s=60", f"hydra.run.dir={run}"]


def test_usr1_at_different_moments_saves_once_at_one_step_requeues_once_and_resumes_there(tmp_path, tiny_shapes):
    run = tmp_path / "run"
    args = [*two_rank_vae_args(tmp_path, tiny_shapes, run), "ckpt=auto"]
    procs = start_ranks(tmp_path, [*args, "trainer.max_steps=100000"], restarts=0, tag="first")
    (tmp_path / "pgids").write_text(" ".join(str(p.pid) for p in procs))
    try:
        wait_for_ranks("the first checkpoint", lambda: (run / "checkpoints" / "step0000004.ckpt").exists(), 240,
                       procs, tmp_path, "first")
        for rank, proc in enumerate(procs):  # rank 0 now, rank 1 a little later: other points of their steps
            time.sleep(0.35 * rank)
            try:
                os.killpg(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:  # already stopped on rank 0's signal: nothing left to tell
                pass
        codes = finish(procs, 120)
    finally:
        finish(procs, 0)
    logs = [(tmp_path / f"first-rank{r}.log").read_text() for r in range(2)]
    tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-2500:]}" for r, (c, log) in enumerate(zip(codes, logs, strict=True)))
    assert None not in codes, f"a rank hung:\n{tails}"
    assert codes == [0, 0], tails  # stopped cleanly, SIGTERM from the requeue included
    # Counted after every process of the job has exited: one requeue, one save, every rank at the same step.
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls == ["requeue 4242"], tails
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, (hpc, tails)
    saved = checkpoint_step(hpc[0])
    agreed = [re.findall(r"requeue signal agreed at step (\d+)", log) for log in logs]
    assert agreed == [[str(saved)], [str(saved)]], tails
    assert saved > 4 and saved % WINDOW == 0, (saved, steps_by_write_time(run))  # at a window boundary
    assert max(s for s, _ in steps_by_write_time(run)) == saved, steps_by_write_time(run)  # no step after it
    assert not (run / "summary.json").exists()  # stopped for the requeue: no final validation, no export

    (tmp_path / "pgids").unlink()
    target = saved + 2
    procs = start_ranks(tmp_path, [*args, f"trainer.max_steps={target}"], restarts=1, tag="resumed")
    codes = finish(procs, 300)
    resumed = "\n".join((tmp_path / f"resumed-rank{r}.log").read_text()[-2500:] for r in range(2))
    assert codes == [0, 0], resumed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == saved and summary["global_step"] == target, summary
    assert summary["optimizer_steps_per_rank"] == [[target, 0], [target, 0]]
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]


def test_sigterm_on_one_rank_stops_both_after_the_same_step(tmp_path, tiny_shapes):
    """SIGTERM reaching one rank only (rank 1 here): Lightning's own handling broadcasts rank 0's flag before
    every batch (a collective and a host read per step) and stops rank 1 alone, which leaves rank 0 waiting in
    its next collective. Agreed once per window instead, both ranks stop after one step, cleanly."""
    run = tmp_path / "run"
    args = [*two_rank_vae_args(tmp_path, tiny_shapes, run), "trainer.max_steps=100000"]
    procs = start_ranks(tmp_path, args, restarts=0, tag="term")
    try:
        wait_for_ranks("the first checkpoint", lambda: (run / "checkpoints" / "step0000004.ckpt").exists(), 240,
                       procs, tmp_path, "term")
        os.killpg(procs[1].pid, signal.SIGTERM)  # rank 1 and its loader workers (which ignore it)
        codes = finish(procs, 120)
    finally:
        finish(procs, 0)
    logs = [(tmp_path / f"term-rank{r}.log").read_text() for r in range(2)]
    tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-2500:]}" for r, (c, log) in enumerate(zip(codes, logs, strict=True)))
    assert None not in codes, f"a rank hung:\n{tails}"
    assert codes == [0, 0], tails
    agreed = [re.findall(r"SIGTERM agreed at step (\d+)", log) for log in logs]
    assert len(agreed[0]) == 1 and agreed[0] == agreed[1], tails
    step = int(agreed[0][0])
    assert step % WINDOW == 0 and step > 4, tails
    assert not list(run.glob("hpc_ckpt_*.ckpt")) and not (run / "summary.json").exists(), tails  # a stop, no save


def test_lightning_still_has_the_per_step_sigterm_broadcast_we_switch_off():
    """ldm.train.preemption replaces this private method on the trainer's epoch loop: a Lightning that renames
    it would bring back a collective and a host read per step without any error."""
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


class _Strategy:
    root_device = torch.device("cpu")

    def __init__(self, others: list[int]) -> None:
        self.others = others  # the other rank's flag at each all-reduce
        self.calls: list[torch.Tensor] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max" and tensor.numel() == 2 and tensor.device == self.root_device
        self.calls.append(tensor.clone())
        other = torch.tensor([self.others[len(self.calls) - 1], 0], dtype=tensor.dtype)  # [requeue, SIGTERM]
        return torch.maximum(tensor, other)


def test_flag_is_agreed_once_per_window_whatever_the_steps_per_batch(monkeypatch):
    """One two-flag all-reduce (requeue, SIGTERM) each time the global step crosses a window boundary: none between the
    micro-batches of an accumulated step, one when the step jumps by 2 (stage=vae's two optimizers)."""
    from types import SimpleNamespace

    from ldm.train import preemption

    strategy = _Strategy(others=[0, 0, 1])
    saved = []
    trainer = SimpleNamespace(global_step=0, world_size=2, strategy=strategy, global_rank=0, is_global_zero=True,
                              loggers=[], default_root_dir="run",
                              _signal_connector=SimpleNamespace(requeue_requested=False, sigterm_requested=False,
                                                                stopping_for_requeue=False),
                              _checkpoint_connector=SimpleNamespace(hpc_save_path=lambda root: f"{root}/hpc_ckpt_1"),
                              save_checkpoint=lambda path: saved.append((path, trainer.global_step)),
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_broadcast_sigterm_tensor=None)))
    monkeypatch.setattr(preemption, "requeue", lambda job: saved.append(("requeue", job)) or 0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    callback = preemption.PreemptionCheckpoint(every_n_steps=4)
    callback.on_train_start(trainer, None)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor is preemption._no_broadcast  # none per step
    # global step after each batch: accumulation (3, 3, 3), then two optimizer steps per batch (6, 8, 10, 12)
    for step in [1, 2, 3, 3, 3, 4, 6, 8, 10]:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert len(strategy.calls) == 2 and not saved  # at steps 4 and 8; nobody had the flag
    trainer.global_step = 12
    with pytest.raises(preemption.PreemptedForRequeue):
        callback.on_train_batch_end(trainer, None, None, None, 0)  # the other rank got USR1: save here too
    assert len(strategy.calls) == 3 and strategy.calls[-1].tolist() == [0, 0]
    assert saved == [("run/hpc_ckpt_1", 12), ("requeue", "77")]
    assert trainer._signal_connector.stopping_for_requeue


@pytest.mark.parametrize("requeued", [True, False])
def test_after_a_requeue_save_late_job_signals_are_ignored(tmp_path, monkeypatch, requeued):
    """A rank's own USR1 can arrive after the ranks agreed on another rank's, and `scontrol requeue` SIGTERMs every
    rank: once a rank has saved for the requeue, neither may kill it on its way out (exit -10 or -15 instead of 0).
    Without a requeue save, fit's end gives back the handlers from before fit."""
    import pytorch_lightning as pl

    from ldm.train.signals import OwnedSignalConnector, own_signal_handlers

    env = fake_slurm_env(tmp_path)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        own_signal_handlers(trainer)
        connector = trainer._signal_connector
        assert isinstance(connector, OwnedSignalConnector)
        connector.register_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)  # SLURM: requeue on USR1
        connector.stopping_for_requeue = requeued
        connector.teardown()
        after = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
        if requeued:
            assert after == {signal.SIGUSR1: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}
        else:
            assert after == before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
