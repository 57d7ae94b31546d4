"""Position math for resuming a finite epoch, also on another number of ranks, workers, batch size or buffer.

A finite epoch has a *plan*: the global positions (in the epoch's end-to-end
shard order, see ldm.data.pipeline.finite_parts) it may still deal, kept as
sorted runs [start, stop). A fresh epoch's plan is every position; the leading
`per_rank * world_size * batch_size` of them are dealt in contiguous slices to
the consumers (rank * workers + worker), the rest are left out.

A consumer reads its slice in position order and shuffles it with a buffer
that is a deterministic function of that sequence, so replaying the buffer on
integers says which positions its first `cursor` outputs were, without I/O.
What an interrupted epoch still owes is therefore: the undealt tail of the plan,
plus for every consumer the samples it held (pulled but in no batch yet) and its
shuffled sequence after its cursor. Sorted, that is the plan a new layout deals
the same way; at most `world_size * batch_size - 1` of it is dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

Runs = list[tuple[int, int]]


@dataclass(frozen=True)
class Layout:
    """Who read an epoch: what a saved position must be interpreted with."""

    world_size: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int

    @property
    def workers(self) -> int:
        """Consumers per rank (the main process reads when there are no workers)."""
        return max(1, self.num_workers)

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer}


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order: shards laid end to end in it define the global positions."""
    order = list(range(num_shards))
    random.Random(f"finite:{seed}:{epoch}").shuffle(order)
    return order


def shuffle_rng(seed: int, epoch: int, index: int, count: int) -> random.Random:
    """The shuffle buffer's randomness of consumer `index` of `count` (the same when replayed on integers)."""
    return random.Random(f"shuffle:{seed}:{epoch}:{index}:{count}")


def worker_share(num_batches: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` yields out of a rank's `num_batches`: the first ones take one more.

    The DataLoader asks its workers in turn, so batch j of the rank comes from worker j % num_workers.
    """
    return num_batches // num_workers + (worker < num_batches % num_workers)


def consumer_slice(per_rank: int, rank: int, worker: int, num_workers: int, batch_size: int) -> tuple[int, int]:
    """[start, stop) indices into the plan that one consumer reads: contiguous, after earlier ranks and workers."""
    before = sum(worker_share(per_rank, w, num_workers) for w in range(worker))
    start = (rank * per_rank + before) * batch_size
    return start, start + worker_share(per_rank, worker, num_workers) * batch_size


def to_runs(positions: Iterable[int]) -> Runs:
    """Sorted distinct positions -> [start, stop) runs."""
    runs: Runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def run_length(runs: Sequence[tuple[int, int]]) -> int:
    return sum(hi - lo for lo, hi in runs)


def take(runs: Sequence[tuple[int, int]], start: int, stop: int) -> Runs:
    """The positions at indices [start, stop) of the plan `runs`, as runs."""
    out: Runs = []
    index = 0
    for lo, hi in runs:
        a, b = max(start - index, 0), min(stop - index, hi - lo)
        if a < b:
            out.append((lo + a, lo + b))
        index += hi - lo
        if index >= stop:
            break
    return out


def positions(runs: Iterable[tuple[int, int]]) -> Iterator[int]:
    for lo, hi in runs:
        yield from range(lo, hi)


def shard_pieces(runs: Sequence[tuple[int, int]], counts: Sequence[int],
                 order: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(shard, lo, hi, first position) sample ranges within shards for the position runs, in position order."""
    pieces = []
    base = 0
    bounds = []
    for shard in order:
        bounds.append((shard, base, base + counts[shard]))
        base += counts[shard]
    j = 0
    for lo, hi in runs:
        while j < len(bounds) and bounds[j][2] <= lo:
            j += 1
        k = j
        while k < len(bounds) and bounds[k][1] < hi:
            shard, s_lo, s_hi = bounds[k]
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a < b:
                pieces.append((shard, a - s_lo, b - s_lo, a))
            k += 1
    return pieces


def pending(
    plan: Sequence[tuple[int, int]],
    per_rank: int,
    layout: Layout,
    cursors: Sequence[int],
    held: Sequence[Sequence[int]],
    order: Callable[[int, list[int]], Iterable[int]],
) -> list[int]:
    """Sorted positions of the plan that no trained batch used: undealt tail, held samples, after each cursor.

    `order(consumer, positions)` replays that consumer's shuffle buffer on its positions.
    """
    left: list[int] = list(positions(take(plan, per_rank * layout.world_size * layout.batch_size,
                                          run_length(plan))))
    for c in range(layout.consumers):
        rank, worker = divmod(c, layout.workers)
        a, b = consumer_slice(per_rank, rank, worker, layout.workers, layout.batch_size)
        output = list(order(c, list(positions(take(plan, a, b)))))
        left += list(held[c]) + output[cursors[c]:]
    left.sort()
    if len(set(left)) != len(left):
        raise RuntimeError("the saved data position lists a sample twice; the checkpoint is inconsistent")
    return left


def replan(left: Sequence[int], layout: Layout) -> tuple[Runs, int, int]:
    """(plan runs, batches per rank, samples dropped) for dealing `left` to a new layout."""
    per_rank = len(left) // (layout.world_size * layout.batch_size)
    return to_runs(left), per_rank, len(left) - per_rank * layout.world_size * layout.batch_size


def runs_tensor(runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Runs as an Nx2 int64 tensor: compact in a checkpoint and loadable with weights_only=True."""
    return torch.tensor(list(runs), dtype=torch.int64).reshape(-1, 2)


def tensor_runs(tensor: torch.Tensor | Sequence[Sequence[int]]) -> Runs:
    rows = tensor.tolist() if isinstance(tensor, torch.Tensor) else tensor
    return [(int(lo), int(hi)) for lo, hi in rows]
