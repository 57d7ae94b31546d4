"""Resume through the real entry point after a hard kill, and checkpoint files that are never half written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldm.checkpoints.files import load_torch_file
from ldm.train.checkpoint_io import AtomicCheckpointIO
from ldm.train.run_dir import find_run_checkpoint

from .conftest import ROOT, run_script
from .test_end_to_end import USER_DATA


class _FailsWhilePickled:
    """Raises while torch.save is writing it: a save that dies halfway, after most bytes are out."""

    def __reduce__(self):
        raise OSError("disk full (simulated)")


def test_failed_save_leaves_previous_checkpoint_usable(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)
    big = torch.randn(256, 1024)  # ~1 MB written before the failing object
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 6, "big": big, "boom": _FailsWhilePickled()}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 4 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind
    assert find_run_checkpoint(tmp_path) == path


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    """SIGKILL while a large checkpoint is being written: the old file is intact, the partial one is not *.ckpt."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    # The child stalls inside torch.save with its temporary file open, so the kill lands mid-write every time.
    code = ("import sys, time, torch; from ldm.train.checkpoint_io import AtomicCheckpointIO\n"
            "class Stall:\n    def __reduce__(self):\n        time.sleep(120)\n        return (int, (0,))\n"
            "AtomicCheckpointIO().save_checkpoint({'global_step': 3, 'x': torch.ones(8, 1024, 1024), 'y': Stall()}, "
            "sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.endswith(".partial") for p in path.parent.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the child ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert find_run_checkpoint(tmp_path) == path  # the leftover partial file is never taken for a checkpoint


def test_kill9_during_training_then_resume(tmp_path, tiny_shapes):
    """kill -9 after the first checkpoint; ckpt=last continues from it and ends where an uninterrupted run ends."""
    steps = 10
    args = [*USER_DATA, f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val", "paths.runs=runs",
            "paths.exports=exports", "stage=vae", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir()
    whole.mkdir()
    # The uninterrupted run alongside the one to kill (their own dirs, one thread each): the two share the 2 cores.
    uninterrupted_run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=whole, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "runs" / "vae").glob("*/checkpoints/step0000002.ckpt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((killed / "runs" / "vae").glob("*/summary.json"))

    run_script("train.py", *args, "ckpt=last", cwd=killed)
    resumed = [json.loads(p.read_text()) for p in (killed / "runs" / "vae").glob("*/summary.json")]
    assert len(resumed) == 1
    assert "checkpoints" in resumed[0]["resumed_from"] and 2 <= resumed[0]["start_step"] < steps

    output, _ = uninterrupted_run.communicate(timeout=600)
    assert uninterrupted_run.returncode == 0, output[-4000:]
    (uninterrupted,) = [json.loads(p.read_text()) for p in (whole / "runs" / "vae").glob("*/summary.json")]
    assert resumed[0]["global_step"] == uninterrupted["global_step"] == steps
    assert resumed[0]["optimizer_steps_per_rank"] == uninterrupted["optimizer_steps_per_rank"] == [[steps, 0]]
    # Where it ends: the same weights and optimizer state (moments and step counts) as the uninterrupted run, up to
    # float summation order. Attention key biases are left out: their exact gradient is zero (softmax ignores a
    # shift shared by all keys), so AdamW turns rounding noise into lr-sized steps that differ between any two runs.
    (end_resumed,) = (killed / "runs" / "vae").glob(f"*/checkpoints/step{steps:07d}.ckpt")
    (end_whole,) = (whole / "runs" / "vae").glob(f"*/checkpoints/step{steps:07d}.ckpt")
    a, b = (load_torch_file(p) for p in (end_resumed, end_whole))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in b["state_dict"].items():
        if not name.endswith(".k.bias"):
            torch.testing.assert_close(a["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2  # autoencoder and discriminator
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for index, state in opt_b["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(opt_a["state"][index][key], value, rtol=1e-4, atol=1e-5,
                                           msg=f"optimizer state {index}.{key}")
