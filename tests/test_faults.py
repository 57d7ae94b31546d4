"""Non-finite losses skip their step (on every rank together), too many stop the run with a checkpoint, and a
stalled rank fails the job after faults.collective_timeout_s instead of hanging it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ldm.train.faults import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    build_strategy,
    skip_nonfinite,
)

from .conftest import ROOT


class Toy(pl.LightningModule):
    """A linear model whose loss is made NaN at chosen (rank, batch) pairs; records weights after each batch."""

    def __init__(self, bad: dict[int, list[int]], out: str | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad, self.out = bad, out
        self.history: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        if batch_idx in self.bad.get(self.global_rank, []):
            loss = loss * float("nan")
        skip_nonfinite(self, loss)  # as LatentDiffusionModule does: the guard drops the update
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.history.append(self.layer.weight.detach().clone())

    def on_train_end(self) -> None:
        if self.out:
            guard = next(c for c in self.trainer.callbacks if isinstance(c, NonFiniteLossGuard))
            record = {"skipped": guard.skipped, "weight": self.layer.weight.flatten().tolist(),
                      "finite": bool(torch.isfinite(self.layer.weight).all())}
            Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        # Loader workers as users run them: forked processes that inherit the trainer's state and handlers.
        return DataLoader(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), batch_size=2,
                          num_workers=2, persistent_workers=True)


def _trainer(tmp_path, callbacks: list[pl.Callback], max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, **kwargs)


def test_nonfinite_loss_skips_the_step(tmp_path, one_thread):
    torch.manual_seed(0)
    module, guard = Toy(bad={0: [2, 3]}), NonFiniteLossGuard(max_consecutive=3)
    _trainer(tmp_path, [guard], 6, enable_checkpointing=False).fit(module)
    w = module.history
    assert torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])  # batches 2 and 3 changed nothing
    assert not torch.equal(w[3], w[4]) and all(torch.isfinite(x).all() for x in w)
    assert guard.skipped == 2 and guard.consecutive == 0
    assert guard.state_dict() == {"skipped": 2}  # kept in checkpoints


def test_consecutive_nonfinite_losses_stop_with_a_checkpoint(tmp_path, one_thread):
    torch.manual_seed(0)
    module, guard = Toy(bad={0: list(range(1, 100))}), NonFiniteLossGuard(max_consecutive=3)
    ckpts = tmp_path / "checkpoints"
    trainer = _trainer(tmp_path, [guard, ModelCheckpoint(dirpath=str(ckpts))], 20)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses.*ckpt="):
        trainer.fit(module)
    (saved,) = ckpts.glob("nonfinite-step*.ckpt")
    state = torch.load(saved, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["layer.weight"], module.history[0])  # the weights of the last finite step


class FusedToy(Toy):
    """Toy with fused AdamW, as ldm.train.optim builds it: the skip happens on the device."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)


def test_fused_optimizer_skips_on_the_device_and_reads_once_per_window(tmp_path, one_thread):
    torch.manual_seed(0)
    module, guard = FusedToy(bad={0: [2, 3]}), NonFiniteLossGuard(max_consecutive=3)
    trainer = _trainer(tmp_path, [guard], 8, enable_checkpointing=False, log_every_n_steps=4)
    trainer.fit(module)
    w = module.history
    assert torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])  # batches 2 and 3 changed nothing
    assert not torch.equal(w[3], w[4]) and all(torch.isfinite(x).all() for x in w)
    opt = trainer.optimizers[0]
    assert [int(s["step"]) for s in opt.state.values()] == [6, 6]  # 8 steps, 2 of them undone by the kernel
    assert all(torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all()
               for s in opt.state.values())
    assert guard.skipped == 2 and guard.consecutive == 0
    assert guard.host_reads == 2  # steps 0-3 and 4-7: one read per log_every_n_steps window, not per step


def test_fused_optimizer_consecutive_nonfinite_still_stop(tmp_path, one_thread):
    torch.manual_seed(0)
    module, guard = FusedToy(bad={0: list(range(1, 100))}), NonFiniteLossGuard(max_consecutive=3)
    ckpts = tmp_path / "checkpoints"
    trainer = _trainer(tmp_path, [guard, ModelCheckpoint(dirpath=str(ckpts))], 20, log_every_n_steps=5)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses.*ckpt="):
        trainer.fit(module)
    assert trainer.global_step == 4  # read before the fifth update (the end of the first window), stopped there
    (saved,) = ckpts.glob("nonfinite-step*.ckpt")
    state = torch.load(saved, map_location="cpu", weights_only=True)
    assert torch.equal(state["state_dict"]["layer.weight"], module.history[0])  # the last finite step's weights
    (guard_state,) = [v for k, v in state["callbacks"].items() if "NonFiniteLossGuard" in k]
    assert guard_state == {"skipped": 3}  # steps 1-3; the fifth never reached its update


def _ddp_main(out: str, scenario: str) -> None:
    """Run in a fresh interpreter (see _run_ddp): 2 CPU ranks over gloo, started by spawn."""
    from pytorch_lightning.strategies import DDPStrategy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if scenario == "one_rank_nan":
        module, max_steps = Toy(bad={1: [2]}, out=out), 5
    elif scenario == "one_rank_nan_fused":  # the device-side skip (fused AdamW's found_inf)
        module, max_steps = FusedToy(bad={1: [2]}, out=out), 5
    else:
        raise ValueError(scenario)
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=5))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[NonFiniteLossGuard(3)], default_root_dir=out)
    trainer.fit(module)


def _run_ddp(tmp_path, scenario: str, timeout: float) -> subprocess.CompletedProcess:
    code = f"from tests.test_faults import _ddp_main; _ddp_main({str(tmp_path)!r}, {scenario!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("scenario", ["one_rank_nan", "one_rank_nan_fused"])
def test_ddp_skip_is_collective(tmp_path, scenario):
    """Only rank 1 sees a NaN; both ranks skip that step (no hang) and keep identical weights."""
    proc = _run_ddp(tmp_path, scenario, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    assert ranks[0]["weight"] == ranks[1]["weight"] and ranks[0]["finite"]


# Loaded by every interpreter the test starts (the PYTHONPATH entry). Both ranks enter the rendezvous together
# (rank 1 starts long after rank 0 on a busy machine, and the rendezvous has the same short timeout); then in rank 1
# (the child Lightning starts, LOCAL_RANK=1) the second backward stops answering, as a rank stuck in a driver or on
# a dead node would.
_STALL_RANK_1 = """
import os, pathlib, time
import torch
import torch.distributed

_init = torch.distributed.init_process_group
_marks = pathlib.Path(os.environ["STALL_MARKS"])


def _init_together(*args, **kwargs):
    (_marks / ("ready" + os.environ.get("LOCAL_RANK", "0"))).touch()
    deadline = time.time() + 300
    while not all((_marks / f"ready{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.1)
    return _init(*args, **kwargs)


torch.distributed.init_process_group = _init_together
if os.environ.get("LOCAL_RANK") == "1":
    _backward, _calls = torch.Tensor.backward, [0]

    def _stalling_backward(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == 2:
            (_marks / "stalled").write_text(str(time.time()))
            time.sleep(600)
        return _backward(self, *args, **kwargs)

    torch.Tensor.backward = _stalling_backward
"""


def test_stalled_rank_fails_after_the_collective_timeout(tmp_path, tiny_shapes):
    """train.py under DDP, rank 1 stalls mid-training: faults.collective_timeout_s (through build_strategy) ends
    the job with rank 0's `error:` line, not the 600 s stall nor PyTorch's 30 min default."""
    from .test_end_to_end import USER_DATA

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STALL_RANK_1)
    mark = tmp_path / "stalled"
    timeout_s = 15
    args = ["stage=vae", *USER_DATA, f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
            "trainer.limit_val_batches=0", "paths.runs=runs", "paths.exports=exports",
            f"faults.collective_timeout_s={timeout_s}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "STALL_MARKS": str(tmp_path)}
    # Output to files: the stalled rank 1 (and its loader workers) outlive rank 0, and would hold pipes open.
    with open(tmp_path / "stdout", "w") as out_file, open(tmp_path / "stderr", "w") as err_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                stdout=out_file, stderr=err_file, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=180)  # rank 0: the process the user (or the launcher) started
        except subprocess.TimeoutExpired:
            code = None
        ended = time.time()
        try:
            os.killpg(proc.pid, 9)  # the stalled rank 1 and every loader worker
        except ProcessLookupError:
            pass
        proc.wait()
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert code is not None, f"still running 180 s after the start:\n{err[-3000:]}"
    assert mark.exists(), f"rank 1 never reached its stall:\n{out[-2000:]}\n{err[-3000:]}"
    waited = ended - float(mark.read_text())
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: rank 0: a collective operation failed"), err[-3000:]
    assert f"faults.collective_timeout_s={timeout_s}" in errors[0]
    assert timeout_s - 1 < waited < timeout_s + 60, waited  # failed by the setting's timeout, not another one


def test_build_strategy_sets_the_timeout():
    ddp = build_strategy("ddp", 42, find_unused_parameters=True)
    assert ddp._timeout == timedelta(seconds=42) and ddp._ddp_kwargs["find_unused_parameters"] is True
    assert build_strategy("auto", 42, devices=2)._timeout == timedelta(seconds=42)
    assert build_strategy("auto", 42, devices=1) == "auto"
    assert build_strategy("fsdp", 42)._timeout == timedelta(seconds=42)


def _nan_on_calls(fn, bad_calls: set[int]):
    """Wrap a loss function so that its n-th call (0-based) in bad_calls returns a NaN loss."""
    calls = [0]

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        n, calls[0] = calls[0], calls[0] + 1
        if n not in bad_calls:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    return wrapped


def test_autoencoder_module_skips_both_optimizers(tmp_path, one_thread):
    """stage=vae (manual optimization): a NaN generator loss steps neither optimizer; training reaches max_steps."""
    from .test_autoencoder_training import _loader, _module

    torch.manual_seed(0)
    module, guard = _module(), NonFiniteLossGuard(max_consecutive=3)
    module.loss.generator = _nan_on_calls(module.loss.generator, {1, 2})
    weights = []  # (autoencoder, discriminator) weights before each batch
    module.on_train_batch_start = lambda batch, idx: weights.append(
        (module.autoencoder.decoder.conv_out.weight.detach().clone(),
         next(module.loss.discriminator.parameters()).detach().clone()))
    trainer = _trainer(tmp_path, [guard], 4, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, _loader())
    # Fused AdamW skips on the device: a skipped step still counts in global_step (as in stage=ldm), and
    # changes no weight of either optimizer (the discriminator starts at disc_start=2, batch 2 is skipped).
    assert trainer.global_step == 4 and guard.skipped == 2
    assert module.optimizer_steps == [4, 2]  # steps taken, the skipped ones included
    assert not torch.equal(weights[0][0], weights[1][0])
    assert torch.equal(weights[1][0], weights[2][0]) and torch.equal(weights[2][0], weights[3][0])
    assert torch.equal(weights[2][1], weights[3][1])  # the discriminator's first step (batch 2) was skipped
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {2}  # 4 steps, 2 undone by the kernel
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_latent_diffusion_module_drops_the_update(tmp_path, one_thread):
    """stage=ldm (automatic optimization): the step with a NaN loss leaves the UNet weights as they were."""
    from tests.ldm_factory import tiny_ldm

    torch.manual_seed(0)
    module, guard = tiny_ldm(), NonFiniteLossGuard(max_consecutive=3)
    module.denoising_error = _nan_on_calls(module.denoising_error, {1})
    weights = []
    module.on_train_batch_start = lambda batch, idx: weights.append(module.unet.out[2].weight.detach().clone())
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "caption": "c"} for _ in range(12)]
    trainer = _trainer(tmp_path, [guard], 3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(images, batch_size=4))
    assert guard.skipped == 1
    assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])  # step 1 dropped
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
