"""Requeue and termination signals act only in the process that owns the trainer.

SLURM delivers `--signal=USR1@90`, `scancel -s USR1` and the SIGTERM of a requeue or time limit to every
process of the job step, DataLoader workers included. The workers are forked from the trainer process, so
they inherit Lightning's Python-level handlers together with a copy of the trainer frozen at fork time. A
worker that runs the USR1 handler saves that stale copy (global step 0 for persistent workers) as the next
`hpc_ckpt_N.ckpt`, and a requeued job can resume from it; the SIGTERM handler would kill the launcher's
ranks and broadcast on the trainer's process group from the wrong process.

`OwnedSignalConnector` registers Lightning's handlers as usual and then wraps each one so that it runs
only in the process that registered it. Every process forked later (loader workers, compile workers)
ignores the signal; its parent shuts it down. Wrapping at registration, before any worker exists, leaves
no window between a fork and a worker's own set-up in which the inherited handler could still act.

PyTorch's loader workers also install a C-level SIGTERM handler that ends the worker unless the parent
sent the signal. SLURM's SIGTERM then kills every worker at once, and the trainer process fails with
"DataLoader worker ... is killed by signal: Terminated" instead of stopping cleanly at the next step
(Lightning's SIGTERM path). `ignore_job_signals`, the loaders' worker_init_fn, takes both signals away
from the workers for good: they end when their parent shuts them down or dies.

Nothing is done inside a handler beyond setting a flag. Lightning's USR1 handler saves the checkpoint there,
and the save ends in a barrier; each rank runs its handler wherever in its step the signal finds it, so that
barrier pairs with another rank's gradient all-reduce or loss check and the job hangs (with NCCL until the
collective timeout), never reaching `scontrol requeue`. Its SIGTERM handler broadcasts from the handler, with
the same risk. Here USR1 only sets `requeue_requested` and SIGTERM only sets `sigterm_requested`:
`ldm.train.preemption.PreemptionCheckpoint` has the ranks agree on both flags at a window boundary, save at
that step and requeue, or set `received_sigterm` on every rank so that Lightning's loops stop them after the
same step (one process alone sets it at once).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector


class OwnerOnlyHandler:
    """A signal handler that does nothing outside the process that installed it."""

    def __init__(self, handler: Any, owner_pid: int) -> None:
        self.handler = handler
        self.owner_pid = owner_pid

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked copy (a loader worker): the trainer's process acts for it
        self.handler(signum, frame)


class OwnedSignalConnector(_SignalConnector):
    """Lightning's signal connector: handlers that only set flags, tied to the trainer's process."""

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__(trainer)
        self.requeue_requested = False  # USR1 arrived; PreemptionCheckpoint acts on it at a step boundary
        self.stopping_for_requeue = False  # saved for a requeue: the process is on its way out
        self.sigterm_requested = False  # SIGTERM arrived here; with several ranks they agree on it first

    def _slurm_sigusr_handler_fn(self, signum: int, _: FrameType | None) -> None:
        self.requeue_requested = True  # no save, no collective, no I/O here (see the module docstring)

    def _sigterm_notifier_fn(self, signum: int, _: FrameType | None) -> None:
        if not self.sigterm_requested and self.trainer.strategy.launcher is not None:
            self.trainer.strategy.launcher.kill(signum)  # Lightning's own child ranks, if it launched them
        self.sigterm_requested = True  # no broadcast from here
        if self.trainer.world_size == 1:
            self.received_sigterm = True  # alone: Lightning's loops stop after this step
        # else PreemptionCheckpoint has the ranks agree at a window boundary, then sets received_sigterm on all

    def teardown(self) -> None:
        """Restore the handlers from before fit; after a requeue save, SIGTERM and the requeue signal stay ignored.

        `scontrol requeue` SIGTERMs every rank while it exits after the save, and a rank's own USR1 can arrive
        after the ranks agreed on another rank's; the default action of either would turn that clean exit into a
        kill (SLURM's SIGKILL after KillWait still ends a process that is stuck).
        """
        if self.stopping_for_requeue:
            for signum in {signal.SIGTERM, *self._requeue_signals()}:
                self._original_handlers.pop(signum, None)
                self._register_signal(signum, signal.SIG_IGN)
        super().teardown()

    def _requeue_signals(self) -> set[int]:
        environment = self.trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
            return {environment.requeue_signal}
        return set()

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        owner = os.getpid()
        for signum in {signal.SIGTERM, *self._requeue_signals()}:
            handler = signal.getsignal(signum)
            if callable(handler) and not isinstance(handler, OwnerOnlyHandler):
                self._register_signal(signum, OwnerOnlyHandler(handler, owner))


def ignore_job_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a loader worker takes no job signals (USR1, SIGTERM); its parent stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _ignores_sigterm(pid: int) -> bool:
    """Whether process `pid` ignores SIGTERM (Linux: the SigIgn mask of /proc/PID/status)."""
    try:
        status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def _kill_loader_workers() -> None:
    """At interpreter exit, end child processes that ignore SIGTERM (loader workers, see above).

    A run that ends in an exception can leave its loader iterator unclosed (the traceback holds it).
    multiprocessing's own exit hook then stops its children with SIGTERM, which loader workers ignore,
    and waits for them forever. Registered after that hook, this one runs first and ends them for good.
    """
    for child in multiprocessing.active_children():
        if child.pid is not None and _ignores_sigterm(child.pid):
            child.kill()
            child.join(timeout=5)


atexit.register(_kill_loader_workers)


def own_signal_handlers(trainer: pl.Trainer) -> None:
    """Give `trainer` the owner-only connector (before fit: Lightning registers the handlers in fit)."""
    trainer._signal_connector = OwnedSignalConnector(trainer)
