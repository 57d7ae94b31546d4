"""Faults during training: non-finite losses, and collectives that can no longer complete.

A single inf/NaN loss (one bad batch, an fp16 overflow) should cost one step, not the run: the step is
skipped and counted. Many in a row mean the run has diverged; it stops with a checkpoint and a message
instead of training on garbage. Under DDP the skip must be decided by all ranks together: a rank that
skips its backward while the others all-reduce gradients would leave them waiting forever, and a rank
that updates while the others do not drifts apart from them.

How a step is skipped depends on the optimization mode. Manual (stage=vae): the module sees the verdict
and returns before its optimizer steps. Automatic (stage=ldm): Lightning refuses a training_step that returns
None under DDP, so the loss goes through backward as usual (the gradient all-reduce stays matched on every
rank) and the update is dropped at the optimizer step. With a fused optimizer (our AdamW whenever the
parameters share one device) and no GradScaler, the flag goes to the kernel as `found_inf` and the skip
happens on the device: no host synchronisation per step, the flags are read once per `log_every_n_steps`
window and the counting and stopping below replay them in order. Otherwise the flag is read before the step
and the gradients are dropped; AdamW leaves parameters without gradients untouched. Either way a skipped
step changes no weight, moment or optimizer step count, and still counts in global_step.

A rank that dies (OOM kill, a node failure) leaves the others blocked in their next collective. The
process group timeout (`faults.collective_timeout_s`, see `build_strategy`) turns that into an error, and
`explain_collective_failure` says what it means.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stopped (a checkpoint was written first)."""


class NonFiniteLossGuard(pl.Callback):
    """Counts skipped steps (saved in checkpoints) and stops after `max_consecutive` in a row (0: never)."""

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 0:
            raise ValueError(f"faults.max_consecutive_nonfinite must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._pending: torch.Tensor | None = None  # automatic optimization: the flag of the current window
        self._window: list[tuple[int, torch.Tensor]] = []  # device-side skips not yet read: (step, flag)
        self.host_reads = 0  # device-side path: how often the flags were read (once per window)

    def check(self, module: pl.LightningModule, loss: torch.Tensor) -> bool:
        """True when this step must be skipped: the loss is non-finite on any rank.

        Under automatic optimization the flag stays on the device until `on_before_optimizer_step`, so the
        forward and backward are queued without a host synchronisation; the check always returns False there.
        """
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        trainer = module.trainer
        if trainer.world_size > 1:  # one decision for all ranks, or the ranks that do step wait forever
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if module.automatic_optimization:
            self._pending = bad if self._pending is None else self._pending + bad
            return False
        return self._decide(module, float(bad) > 0)

    def _decide(self, module: pl.LightningModule, bad: bool, step: int | None = None, log: bool = True) -> bool:
        trainer = module.trainer
        if not bad:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        rank_zero_warn(f"non-finite loss at step {trainer.global_step if step is None else step}: step skipped "
                       f"({self.consecutive} in a row, {self.skipped} in all)")
        if log:
            module.log("train/nonfinite_skipped", float(self.skipped), batch_size=1)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self._stop(trainer)
        return True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Automatic optimization: a flagged step (or accumulation window) updates nothing."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        no_scaler = getattr(trainer.precision_plugin, "scaler", None) is None  # a GradScaler sets found_inf itself
        if self._pending is None:
            if hasattr(optimizer, "found_inf") and no_scaler:
                del optimizer.found_inf  # ours from an earlier step: it must not skip this one
            return
        flag, self._pending = (self._pending > 0).float().reshape(()), None
        if getattr(optimizer, "_step_supports_amp_scaling", False) and no_scaler:
            optimizer.found_inf = flag  # the fused kernel skips the update and undoes its step count
            self._window.append((trainer.global_step, flag))
            if len(self._window) >= max(1, int(trainer.log_every_n_steps or 1)):
                self._flush(pl_module)
            return
        if self._decide(pl_module, float(flag) > 0):  # the one host read, after the backward has been queued
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _flush(self, module: pl.LightningModule, log: bool = True) -> None:
        """Read the window's flags in one transfer and count them in order (may stop the run, as above)."""
        if not self._window:
            return
        steps, flags = zip(*self._window, strict=True)
        self._window = []
        self.host_reads += 1
        for step, bad in zip(steps, torch.stack(flags).tolist(), strict=True):
            self._decide(module, bad > 0, step, log=log)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(pl_module, log=False)  # no logging from on_train_end; the counts are final

    def _stop(self, trainer: pl.Trainer) -> None:
        directory = Path(trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback is not None
                         and trainer.checkpoint_callback.dirpath else trainer.default_root_dir)
        path = directory / f"nonfinite-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it: the decision above was collective
        raise NonFiniteLossError(
            f"{self.consecutive} consecutive non-finite losses (faults.max_consecutive_nonfinite="
            f"{self.max_consecutive}) at step {trainer.global_step}: training stopped. The weights of the last "
            f"finite step are in {path}; continue with ckpt={path} and e.g. a lower learning rate, "
            f"gradient clipping or bf16-mixed instead of 16-mixed.")

    def state_dict(self) -> dict[str, Any]:
        # Skips of the window not read yet count too; they are counted (not re-counted) when it is read.
        unread = int(torch.stack([f for _, f in self._window]).sum()) if self._window else 0
        return {"skipped": self.skipped + unread}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def skip_nonfinite(module: pl.LightningModule, loss: torch.Tensor) -> bool:
    """Called by every training_step with its loss, on every rank: True means this step updates nothing.

    Manual optimization: return without stepping when True. Automatic: return the loss as usual.

    Uses the trainer's NonFiniteLossGuard (added by ldm.train.cli with the configured limit); a module
    trained by another script gets one with the default limit.
    """
    trainer = module._trainer
    if trainer is None:  # a training_step called by hand (tests, notebooks): nothing to coordinate with
        return False
    guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteLossGuard)), None)
    if guard is None:
        guard = NonFiniteLossGuard()
        trainer.callbacks.append(guard)
    return guard.check(module, loss)


def build_strategy(strategy: Any, timeout_s: float | None, find_unused_parameters: bool = False,
                   devices: Any = 1, num_nodes: int = 1) -> Any:
    """The trainer's strategy with a collective timeout: `ddp`/`fsdp` names become strategy objects.

    `auto` on several devices or nodes is what Lightning would pick anyway (ddp), made explicit so that
    the timeout applies. Other names and objects pass through unchanged.
    """
    if not isinstance(strategy, str):
        return strategy
    several = (isinstance(devices, int) and devices > 1) or int(num_nodes) > 1
    name = "ddp" if strategy == "auto" and several else strategy
    timeout = timedelta(seconds=float(timeout_s)) if timeout_s else None
    if name in ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"):
        from pytorch_lightning.strategies import DDPStrategy

        find = find_unused_parameters or name == "ddp_find_unused_parameters_true"
        return DDPStrategy(find_unused_parameters=find, **({"timeout": timeout} if timeout else {}))
    if name == "fsdp":  # the UNet sharded by its blocks, frozen parts whole, float32 buffers (ldm.train.fsdp)
        from ldm.train.fsdp import ShardedUNetStrategy

        return ShardedUNetStrategy(**({"timeout": timeout} if timeout else {}))
    return strategy


_COLLECTIVE_SIGNS = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "timed out", "Timed out", "Timeout", "NCCL", "ProcessGroup", "gloo")


def explain_collective_failure(err: BaseException, rank: int, timeout_s: float | None) -> str | None:
    """A one-line reading of an error that looks like a failed collective (None when it does not)."""
    text = f"{type(err).__name__}: {err}"
    if not any(sign in text for sign in _COLLECTIVE_SIGNS):
        return None
    return (f"rank {rank}: a collective operation failed: another rank died or stalled for longer than "
            f"faults.collective_timeout_s={timeout_s}. That rank's own log says why. ({text.splitlines()[0][:300]})")
