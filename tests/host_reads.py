"""Counting host synchronisations while the real Lightning loop trains (tests/test_host_sync.py).

On a GPU every read of a device tensor by Python (`.item()`, `bool()`, `float()`, `.tolist()`, `.cpu()`)
waits for all queued kernels, and every collective is a rendezvous of all ranks. On the CPU neither costs
anything, so the tests count the calls instead: a step that makes none queues its work and moves on.
On the CPU every tensor is a host tensor, so the counter cannot tell a device read from a read of a tensor that
lives on the host on a GPU run as well; the tests name those (`exempt`) and count them apart.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
COLLECTIVES = ("barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "all_gather_object", "broadcast_object_list", "reduce_scatter")
STRATEGY_CALLS = ("barrier", "reduce", "all_gather", "broadcast", "reduce_boolean_decision")


class HostReadCounter(pl.Callback):
    """Counts host reads, collectives and Python numbers logged, per training step (batch_idx).

    A step's count runs from its on_train_batch_start to the next one's, so the logger's and progress
    bar's reads after a step count for that step.
    """

    def __init__(self, exempt: tuple[tuple[str, str, str], ...] = ()) -> None:
        self.exempt = exempt  # host-side reads: (kind, "dir/file.py", function) of the reading frame
        self.exempted: Counter[str] = Counter()
        self.logged_steps: list[int] = []
        self.step: int | None = None
        self.per_step: Counter[int] = Counter()
        self.sites: Counter[tuple[str, str]] = Counter()
        self.logged_numbers = 0
        self.trace: list[tuple[int, str, str]] = []

    def record(self, kind: str) -> None:
        if self.step is None:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "host_reads.py" not in f.filename
                  and "/torch/" not in f.filename and "/lightning_utilities/" not in f.filename]
        chain = " < ".join(f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno} {f.name}" for f in frames[-9:][::-1])
        first = chain.split(" < ")[0]
        for exempt_kind, path, function in self.exempt:
            if kind == exempt_kind and first.startswith(f"{path}:") and first.endswith(f" {function}"):
                self.exempted[f"{kind} at {first}"] += 1
                return
        self.per_step[self.step] += 1
        self.sites[(kind, chain)] += 1
        self.trace.append((self.step, kind, chain))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = None  # validation is not the hot loop

    @property
    def total(self) -> int:
        return sum(self.per_step.values())


@contextlib.contextmanager
def counting(counter: HostReadCounter) -> Iterator[HostReadCounter]:
    """Patch the reads, the collectives and LightningModule.log for the duration."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.record(kind)
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in READS:
        patch(torch.Tensor, name, f"Tensor.{name}")
    for name in COLLECTIVES:
        patch(dist, name, f"dist.{name}")
    from pytorch_lightning.strategies import Strategy

    strategy_classes = {Strategy, *_subclasses(Strategy)}
    for cls in strategy_classes:
        for name in STRATEGY_CALLS:
            if name in vars(cls):
                patch(cls, name, f"strategy.{name}")

    original_log = pl.LightningModule.log

    def log(self: pl.LightningModule, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if counter.step is not None:  # a host-to-device copy on a GPU
                counter.logged_numbers += 1
                counter.logged_steps.append(counter.step)
        return original_log(self, name, value, *args, **kwargs)

    saved.append((pl.LightningModule, "log", original_log))
    pl.LightningModule.log = log
    try:
        yield counter
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out
