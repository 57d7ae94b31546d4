"""SLURM's requeue signal with loader workers on, without a cluster: the job step's environment and a fake
`scontrol` on PATH, and the signal sent to the whole process group, as SLURM sends it to every process of
the step (the forked DataLoader workers too).

Deterministic where tests/test_slurm.py can only be lucky: every process that acts on USR1 calls `scontrol
requeue` and saves a checkpoint, so one call and one hpc_ckpt file, counted once every process of the step has
exited, mean the workers stayed out of it, on every run, whatever order the processes happened to run in.
The two-rank version (ranks signalled at different moments of their steps) is tests/test_preemption.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.train.checkpoint_io import AtomicCheckpointIO, partial_name
from ldm.train.run_dir import checkpoint_step, find_latest_checkpoint, find_run_checkpoint

from .conftest import ROOT
from .test_end_to_end import TINY

STEPS_AFTER_RESUME = 6  # steps the requeued job trains past the furthest save


def fake_slurm_env(tmp_path: Path, restarts: int = 0) -> dict[str, str]:
    """One task of a one-node job step, as srun sets it, with `scontrol` recording its arguments.

    `scontrol requeue` then does what SLURM does to a running job: SIGTERM to every process of the job, here
    the process groups listed in tmp_path/pgids (one per rank), else the caller's own group.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"""#!/bin/sh
trap '' TERM
echo "$*" >> {tmp_path}/scontrol.calls
[ "$1" = requeue ] || exit 0
if [ -f {tmp_path}/pgids ]; then
    for group in $(cat {tmp_path}/pgids); do kill -TERM -- "-$group" 2>/dev/null; done
else
    kill -TERM 0
fi
exit 0
""")
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldm", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": str(restarts),
                "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def steps_by_write_time(run: Path) -> list[tuple[int, str]]:
    """(global step, name) of every checkpoint in the run dir, oldest write first."""
    files = sorted([*run.glob("checkpoints/*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")], key=lambda p: p.stat().st_mtime_ns)
    return [(checkpoint_step(p), p.name) for p in files]


def group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` (a trainer and its loader workers) is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# One run is a proof (see the module docstring); LDM_REPEAT=N repeats it, e.g. to compare with an older checkout.
@pytest.mark.parametrize("attempt", range(int(os.environ.get("LDM_REPEAT", "1"))))
def test_usr1_to_every_process_saves_once_and_resumes_there(tmp_path, tiny_shapes, attempt):
    run = tmp_path / "run"
    # A user's own shards: data=webdataset with its own loader settings (4 workers, persistent, finite epochs).
    tiny = [a for a in TINY if not a.startswith("data.num_workers=")]
    args = [str(ROOT / "train.py"), "stage=vae", "data=webdataset", *tiny, f"data.train_shards={tiny_shapes}/train",
            f"data.val_shards={tiny_shapes}/val", f"paths.runs={tmp_path}/runs", f"paths.exports={tmp_path}/exports",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_train_steps=4", "ckpt=auto", f"hydra.run.dir={run}"]
    # Far more steps than the run will take: it must stop by itself after the requeue save.
    proc = subprocess.Popen([sys.executable, *args, "trainer.max_steps=100000"], cwd=tmp_path, env=fake_slurm_env(tmp_path),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("the first checkpoint", lambda: (run / "checkpoints" / "step0000004.ckpt").exists(), 240, proc)
        os.killpg(proc.pid, signal.SIGUSR1)  # main process and both loader workers, like SLURM
        # The fake scontrol SIGTERMs the whole group on requeue, as SLURM does; the trainer then exits by itself.
        output, _ = proc.communicate(timeout=120)
        # Count only once every process of the step is gone: a worker acting late would still be seen.
        wait_for("every process of the step to exit", lambda: not group_alive(proc.pid), 60)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    # No worker died of SIGTERM under the trainer; the trainer stopped cleanly after its save.
    assert "killed by signal" not in output and proc.returncode == 0, (proc.returncode, output[-3000:])
    assert "requeue signal agreed at step" in output, output[-3000:]
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls == ["requeue 4242"], output[-3000:]  # the trainer process alone asked for the requeue
    (hpc,) = run.glob("hpc_ckpt_*.ckpt")  # ... and alone saved
    saved = checkpoint_step(hpc)
    written = steps_by_write_time(run)
    assert saved >= 4, written
    steps = [s for s, _ in written]
    assert steps == sorted(steps), f"a checkpoint went back in steps: {written}"
    assert not list(run.glob("*.partial")) and not list(run.glob("checkpoints/*.partial"))

    furthest = max(steps)
    assert furthest == saved, written  # training stopped at the requeue save
    target = furthest + STEPS_AFTER_RESUME
    restarted = subprocess.run([sys.executable, *args, f"trainer.max_steps={target}"], cwd=tmp_path,
                               env=fake_slurm_env(tmp_path, restarts=1),
                               capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == furthest >= saved  # continued from the furthest save, not from 0
    assert summary["global_step"] == target
    print(f"attempt {attempt}: signalled after step 4, hpc checkpoint at step {saved}, "
          f"resumed at {summary['start_step']}")


def _save(path: Path, step: int) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)


def _save_at(path: Path, step: int, mtime: int) -> None:
    """A checkpoint of `step`, dated `mtime` seconds: the order of writes is set, not left to the clock."""
    _save(path, step)
    os.utime(path, (mtime, mtime))


def test_resume_picks_the_furthest_step_not_the_newest_file(tmp_path, capsys):
    run = tmp_path / "runs" / "vae" / "a"
    _save_at(run / "checkpoints" / "step0000008.ckpt", 8, 1_000)
    _save_at(run / "hpc_ckpt_1.ckpt", 9, 1_010)
    _save_at(run / "hpc_ckpt_2.ckpt", 0, 1_020)  # written last, but a stale state
    (run / "checkpoints" / "nonfinite-step0000010.ckpt").write_bytes(b"")  # a stopped run is never resumed
    assert find_run_checkpoint(run) == run / "hpc_ckpt_1.ckpt"
    assert "holds step 0, behind hpc_ckpt_1.ckpt (step 9)" in capsys.readouterr().out
    # Equal steps: the newer file wins (last.ckpt is rewritten after the step file of the same step).
    _save_at(run / "checkpoints" / "last.ckpt", 9, 1_030)
    assert find_run_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    os.utime(run / "checkpoints" / "last.ckpt", (1_005, 1_005))  # ... and only the newer one
    assert find_run_checkpoint(run) == run / "hpc_ckpt_1.ckpt"
    # ckpt=last: the run that saved most recently (even with fewer steps), then its furthest checkpoint.
    other = tmp_path / "runs" / "vae" / "b"
    _save_at(other / "checkpoints" / "last.ckpt", 100, 1_040)
    assert find_latest_checkpoint(tmp_path / "runs", "vae") == other / "checkpoints" / "last.ckpt"
    _save_at(run / "checkpoints" / "step0000002.ckpt", 2, 1_050)
    assert find_latest_checkpoint(tmp_path / "runs", "vae") == run / "hpc_ckpt_1.ckpt"


def test_partial_files_do_not_look_like_lightning_versions(tmp_path):
    """Lightning numbers hpc_ckpt_N from the digits after "ckpt_" in every file name of the run dir."""
    name = partial_name("hpc_ckpt_1.ckpt")
    assert "ckpt_" not in name and name.endswith(".partial") and name.startswith(".")


def _stubborn_worker(ready) -> None:
    from ldm.train.signals import ignore_job_signals

    ignore_job_signals(0)
    ready.set()  # the handlers are in place: from now on SIGTERM is ignored
    while True:
        time.sleep(0.1)


def test_workers_that_ignore_sigterm_do_not_hold_up_the_exit():
    """multiprocessing's exit hook stops children with SIGTERM and then waits for them: a loader worker that
    ignores SIGTERM (and whose loader a failed run left open) would hang the process forever. Ours ends them."""
    import multiprocessing

    from ldm.train.signals import _kill_loader_workers

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_stubborn_worker, args=(ready,), daemon=True)
    child.start()
    try:
        assert ready.wait(timeout=30), "the child never installed its handlers"
        child.terminate()  # what multiprocessing's own exit hook does first
        child.join(timeout=1)
        assert child.is_alive()  # ignored
        _kill_loader_workers()
        child.join(timeout=5)
        assert not child.is_alive()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
