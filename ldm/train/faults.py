"""Faults during training: non-finite losses, and collectives that can no longer complete.

A single inf/NaN loss (one bad batch, an fp16 overflow) should cost one step, not the run: the step is
skipped and counted. Many in a row mean the run has diverged; it stops with a checkpoint and a message
instead of training on garbage. Under DDP the skip must be decided by all ranks together: a rank that
skips its backward while the others all-reduce gradients would leave them waiting forever, and a rank
that updates while the others do not drifts apart from them.

How a step is skipped: on the device wherever the optimizers allow it (fused AdamW, our default whenever the
parameters share one device, or a GradScaler under 16-mixed), in both optimization modes. A non-finite loss is
made NaN in place, so its backward makes every gradient NaN; DDP's gradient all-reduce carries that to every
rank, so all ranks see non-finite gradients in the same step without a collective of their own. The flag
"loss or gradients not finite" goes to the fused kernel as `found_inf` (a GradScaler finds it itself), the
flags are read once per `log_every_n_steps` window (one all-reduce on several ranks, so the counts agree) and
the counting and stopping below replay them in order. A skipped step changes no weight, moment or optimizer
step count, and still counts in global_step. Only optimizers that cannot skip on the device read the flag
each step: before the backward in manual optimization (stage=vae), where the module returns without stepping,
or before the step in automatic optimization, where the gradients are dropped.

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
    """Counts skipped steps (saved in checkpoints) and stops after `max_consecutive` in a row (0: never).

    The skip is decided on the device where the optimizers allow it (fused AdamW, or a GradScaler): a step's
    flag is "the loss or the gradients are not finite". A non-finite loss is made NaN and so poisons every
    gradient of its rank; DDP's gradient all-reduce then carries it to every rank, so all ranks see the same
    non-finite gradients and skip together, with no collective of its own. The flags are read (and, on several
    ranks, agreed by one all-reduce) once per `log_every_n_steps` window, where the counting and stopping
    replay them in order.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 0:
            raise ValueError(f"faults.max_consecutive_nonfinite must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._pending: torch.Tensor | None = None  # the losses' flag since the last optimizer step
        self._window: list[tuple[int, torch.Tensor]] = []  # device-side skips not yet read: (step, flag)
        self._batch: int | None = None  # the batch whose flag is the window's last entry (stage 1: two optimizers)
        self.host_reads = 0  # device-side path: how often the flags were read (once per window)

    @staticmethod
    def _device_side(trainer: pl.Trainer) -> bool:
        """Every optimizer can skip on the device: a GradScaler skips non-finite gradients itself, a fused
        optimizer takes our flag as `found_inf`."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return True
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
        return bool(optimizers) and all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)

    def check(self, module: pl.LightningModule, loss: torch.Tensor) -> bool:
        """True when this step must be skipped now (host path of manual optimization only), else False.

        Device path: the flag stays on the device and a non-finite loss is made NaN in place, so its backward
        poisons the gradients (see the class docstring); nothing is read here.
        """
        trainer = module.trainer
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self._device_side(trainer) or module.automatic_optimization:
            if loss.grad_fn is not None:  # recorded by autograd: the backward multiplies every gradient by NaN
                loss.mul_(torch.where(bad.reshape(()) > 0, torch.nan, 1.0).to(loss.dtype))
            self._pending = bad if self._pending is None else torch.maximum(self._pending, bad)
            return False
        # Manual optimization with optimizers that cannot skip on the device: decide before the backward,
        # together with the other ranks (one all-reduce and one read per step; fused AdamW avoids both).
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
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
            module.log("train/nonfinite_skipped", torch.tensor(float(self.skipped), device=module.device),
                       batch_size=1)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self._stop(trainer)
        return True

    @staticmethod
    def _gradients_nonfinite(optimizer: torch.optim.Optimizer, like: torch.Tensor) -> torch.Tensor:
        """1.0 when any gradient of `optimizer` holds an inf or NaN, on the device; no host read."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.zeros_like(like)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        flags = [(~torch.stack([n.float() for n in torch._foreach_norm(gs, float("inf"))]).isfinite()).any()
                 for gs in by_device.values()]
        return torch.stack([f.to(like.device) for f in flags]).any().float().reshape(1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """A flagged step (or accumulation window) updates nothing: the flag goes to the optimizer."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        no_scaler = getattr(trainer.precision_plugin, "scaler", None) is None  # a GradScaler sets found_inf itself
        if self._pending is None and not self._device_side(trainer):
            return  # manual optimization's host path decided before the backward
        pending = self._pending if self._pending is not None else torch.zeros(1, device=pl_module.device)
        self._pending = None
        # Under a GradScaler, overflowing (scaled) gradients are its business: only the loss counts.
        flag = pending if not no_scaler else torch.maximum(pending, self._gradients_nonfinite(optimizer, pending))
        if self._batch == trainer.fit_loop.total_batch_idx and self._window:  # a second optimizer, same batch
            step, before = self._window[-1]
            flag = torch.maximum(before, flag)
            self._window[-1] = (step, flag)
        else:
            self._batch = trainer.fit_loop.total_batch_idx
            self._window.append((trainer.global_step, flag))
        flag = flag.reshape(())
        if getattr(optimizer, "_step_supports_amp_scaling", False) and no_scaler:
            optimizer.found_inf = flag  # the fused kernel skips the update and undoes its step count
        elif no_scaler:  # an optimizer that cannot skip on the device: one read per step, gradients dropped
            self._window.pop()
            if self._decide(pl_module, float(flag) > 0):
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
            return
        if len(self._window) >= max(1, int(trainer.log_every_n_steps or 1)) and self._batch_complete(trainer):
            self._flush(pl_module)

    @staticmethod
    def _batch_complete(trainer: pl.Trainer) -> bool:
        """Automatic optimization flushes at once; manual waits for the batch's last optimizer (on_train_batch_end)."""
        return trainer.lightning_module.automatic_optimization

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not pl_module.automatic_optimization and len(self._window) >= max(1, int(trainer.log_every_n_steps or 1)):
            self._flush(pl_module)

    def _flush(self, module: pl.LightningModule, log: bool = True) -> None:
        """Read the window's flags in one transfer (agreed by all ranks in one all-reduce) and count them in order
        (may stop the run, as above)."""
        if not self._window:
            return
        steps, flags = zip(*self._window, strict=True)
        self._window = []
        self.host_reads += 1
        stacked = torch.cat(flags)
        trainer = module.trainer
        if trainer.world_size > 1:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        for step, bad in zip(steps, stacked.tolist(), strict=True):
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
        unread = int(torch.cat([f for _, f in self._window]).sum()) if self._window else 0
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
