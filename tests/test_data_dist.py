"""Equal batch counts per rank and per-epoch coverage, with real DDP processes and DataLoader workers.

The shard sizes 7, 13, 20, 3, 9 are the ones that hang naive `split_by_node` pipelines.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.data.pipeline import (
    TrainStream,
    expand_shards,
    finite_batches,
    finite_parts,
    shard_counts,
    worker_share,
)
from tests.conftest import TinyImageModule

SIZES = (7, 13, 20, 3, 9)
BATCH, WORLD, WORKERS, EPOCHS = 4, 2, 2, 3


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, sizes: tuple[int, ...] = SIZES, stats: bool = True, prefix: str = "s") -> list[str]:
    """Tiny 8 px PNG shards; keys say which shard and sample they are (s2_0005)."""
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s, n in enumerate(sizes):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                png = io.BytesIO()
                Image.new("RGB", (8, 8), (s * 40, i * 10 % 256, 7)).save(png, format="PNG")
                _add(tar, f"{prefix}{s}_{i:04d}.png", png.getvalue())
                _add(tar, f"{prefix}{s}_{i:04d}.txt", f"shard {s} sample {i}".encode())
        if stats:
            (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n}))
        urls.append(str(path))
    return urls


def _all_keys(sizes: tuple[int, ...]) -> set[str]:
    return {f"s{s}_{i:04d}" for s, n in enumerate(sizes) for i in range(n)}


def _rank_main(rank: int, root: str, out: str) -> None:
    """One DDP rank: both modes, EPOCHS epochs each, an all_reduce after every batch (hangs if uneven)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    result: dict[str, list[list[list[str]]]] = {}
    urls = expand_shards(f"{root}/shards")
    for mode, extra in (("finite", {"counts": shard_counts(urls)}), ("resampled", {"epoch_length": 5})):
        # what ShardDataModule.setup builds on this rank (importing Lightning in each rank costs seconds)
        stream = TrainStream(urls, resolution=8, batch_size=BATCH, rank=dist.get_rank(), world_size=WORLD,
                             shuffle_buffer=8, seed=5, mode=mode, **extra)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=WORKERS, persistent_workers=True)
        epochs = []
        for _ in range(EPOCHS):
            batches = []
            for batch in loader:
                assert batch["image"].shape == (BATCH, 3, 8, 8)
                batches.append(batch["key"])
                dist.all_reduce(torch.ones(1))  # a rank with fewer batches would leave the other waiting here
            count = torch.tensor([len(batches)])
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            assert count.item() == len(batches), (rank, mode, count.item(), len(batches))
            epochs.append(batches)
        result[mode] = epochs
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _spawn_ranks(root: Path, timeout: float = 90.0) -> list[dict]:
    import torch.multiprocessing as mp

    # fork: the ranks start at once instead of importing torch again (their DataLoader workers fork too)
    ctx = mp.start_processes(_rank_main, args=(str(root), str(root)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"DDP ranks did not finish within {timeout} s (a hang)")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_ranks_two_workers_uneven_shards(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "shards")
    results = _spawn_ranks(tmp_path)
    everything = _all_keys(SIZES)

    # finite: 52 samples, 2 ranks x 4 per batch -> 6 batches per rank, 4 samples left out
    per_rank = finite_batches(sum(SIZES), WORLD, BATCH)
    assert per_rank == 6
    left_out = []
    for epoch in range(EPOCHS):
        keys = []
        for rank in range(WORLD):
            batches = results[rank]["finite"][epoch]
            assert len(batches) == per_rank
            keys += [k for batch in batches for k in batch]
        assert len(keys) == len(set(keys)) == per_rank * WORLD * BATCH  # nothing seen twice
        missing = everything - set(keys)
        assert len(missing) == sum(SIZES) - len(keys) <= WORLD * BATCH - 1
        left_out.append(frozenset(missing))
        # exactly the samples the plan deals for this epoch: the epoch reached the persistent workers
        counts = shard_counts(urls)
        for rank in range(WORLD):
            planned = {f"s{s}_{i:04d}"
                       for w in range(WORKERS)
                       for s, lo, hi in finite_parts(counts, seed=5, epoch=epoch, rank=rank, world_size=WORLD,
                                                     worker=w, num_workers=WORKERS, batch_size=BATCH)
                       for i in range(lo, hi)}
            assert planned == {k for batch in results[rank]["finite"][epoch] for k in batch}
    assert len(set(left_out)) > 1  # which samples are left out changes with the epoch

    # resampled: 5 batches per rank per epoch; ranks read disjoint shards; epochs differ
    for epoch in range(EPOCHS):
        per_rank_keys = []
        for rank in range(WORLD):
            batches = results[rank]["resampled"][epoch]
            assert len(batches) == 5 and all(len(b) == BATCH for b in batches)
            per_rank_keys.append({k for b in batches for k in b})
        assert not per_rank_keys[0] & per_rank_keys[1]
    assert results[0]["resampled"][0] != results[0]["resampled"][1]


@pytest.mark.parametrize("sizes", [SIZES, (7, 13), (20,), (0, 5, 0, 11)])
@pytest.mark.parametrize("world_size,num_workers,batch_size", [(2, 2, 4), (3, 2, 2), (1, 3, 5), (4, 1, 1)])
def test_finite_plan_covers_each_epoch(sizes, world_size, num_workers, batch_size) -> None:
    """The plan alone, for fewer shards than consumers and empty shards too: disjoint, equal, near-complete."""
    per_rank = finite_batches(sum(sizes), world_size, batch_size)
    if per_rank == 0:
        return
    for epoch in range(3):
        taken: list[tuple[int, int]] = []
        for rank in range(world_size):
            for worker in range(num_workers):
                parts = finite_parts(list(sizes), seed=1, epoch=epoch, rank=rank, world_size=world_size,
                                     worker=worker, num_workers=num_workers, batch_size=batch_size)
                samples = [(s, i) for s, lo, hi in parts for i in range(lo, hi)]
                assert len(samples) == worker_share(per_rank, worker, num_workers) * batch_size
                taken += samples
        assert len(taken) == len(set(taken)) == per_rank * world_size * batch_size
        assert sum(sizes) - len(taken) <= world_size * batch_size - 1


def test_fewer_shards_than_consumers_and_scanned_counts(tmp_path: Path) -> None:
    """2 shards, 2 ranks x 2 workers, no stats files: counts come from a scan cached in an index file."""
    urls = write_shards(tmp_path / "s", sizes=(7, 13), stats=False)
    index = tmp_path / "index.json"
    assert shard_counts(urls, index) == [7, 13]
    assert json.loads(index.read_text())[urls[1]]["num_samples"] == 13
    os.utime(urls[0])  # a changed shard is counted again, not trusted from the index
    assert shard_counts(urls, index) == [7, 13]
    keys = []
    for rank in range(2):
        stream = TrainStream(urls, resolution=8, batch_size=2, mode="finite", counts=[7, 13], rank=rank,
                             world_size=2, shuffle_buffer=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        batches = [b["key"] for b in loader]
        assert len(batches) == len(stream) == 5
        keys += [k for b in batches for k in b]
    assert len(keys) == len(set(keys)) == 20


def test_too_little_data_fails_at_start(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "s", sizes=(3,))
    with pytest.raises(ValueError, match="fewer than world_size"):
        TrainStream(urls, resolution=8, batch_size=4, mode="finite", counts=[3], world_size=1)


def test_resume_mid_epoch_skips_what_was_consumed(tmp_path: Path) -> None:
    """A stream is a function of (seed, epoch, rank, worker): a restart yields the rest of the epoch."""
    urls = write_shards(tmp_path / "s")
    for mode, kw in (("resampled", {"epoch_length": 6}), ("finite", {"counts": list(SIZES)})):
        def stream(mode=mode, kw=kw) -> TrainStream:
            return TrainStream(urls, resolution=8, batch_size=4, mode=mode, shuffle_buffer=8, seed=3, **kw)

        full = stream()
        full.set_epoch(2)
        loader = torch.utils.data.DataLoader(full, batch_size=None, num_workers=2)
        epoch = [tuple(b["key"]) for b in loader]
        resumed = stream()
        resumed.set_epoch(2)
        resumed.resume_at(2, 4)
        rest = [tuple(b["key"]) for b in torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=2)]
        assert sorted(rest) == sorted(epoch[4:]), mode


def test_datamodule_finite_mode_with_persistent_workers(tmp_path: Path) -> None:
    from ldm.data.datamodule import ShardDataModule

    write_shards(tmp_path / "s")
    dm = ShardDataModule(train_shards=str(tmp_path / "s"), val_shards=None, resolution=8, batch_size=5,
                         num_workers=2, shuffle_buffer=8, mode="finite")
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    assert [len(e) for e in epochs] == [50, 50] and all(len(set(e)) == 50 for e in epochs)
    assert set(epochs[0]) != set(epochs[1])  # persistent workers still move on to the next epoch
    with pytest.raises(ValueError, match="epoch_length/epoch_samples apply to data.mode=resampled"):
        ShardDataModule(train_shards=str(tmp_path / "s"), val_shards=None, mode="finite", epoch_length=3)
    resampled = ShardDataModule(train_shards=str(tmp_path / "s"), val_shards=None, resolution=8, batch_size=5,
                                num_workers=0, mode="resampled", epoch_samples=1000)
    resampled.setup("fit")
    assert len(resampled.train_dataloader()) == 200  # an epoch length in samples: 1000 / (1 rank x 5)


class _Recorder(pl.Callback):
    """Keys of every training batch, by epoch."""

    def __init__(self) -> None:
        self.keys: dict[int, list[tuple[str, ...]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.setdefault(trainer.current_epoch, []).append(tuple(batch["key"]))


@pytest.mark.parametrize("mode", ["resampled", "finite"])
def test_lightning_resume_mid_epoch_continues_the_epoch(tmp_path: Path, mode: str) -> None:
    """Stopped after 3 of 6 batches and resumed from that checkpoint: the run sees the other 3, then epoch 1."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ldm.data.datamodule import ShardDataModule

    write_shards(tmp_path / "s")
    data = {"train_shards": str(tmp_path / "s"), "val_shards": None, "resolution": 8, "num_workers": 2,
            "shuffle_buffer": 8, "seed": 1, "mode": mode}
    data.update({"batch_size": 4, "epoch_length": 6} if mode == "resampled" else {"batch_size": 8})

    def fit(max_steps: int = -1, ckpt_path: str | None = None) -> _Recorder:
        recorder = _Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = pl.Trainer(max_epochs=2, max_steps=max_steps, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, checkpoint],
                             num_sanity_val_steps=0)
        trainer.fit(TinyImageModule(), datamodule=ShardDataModule(**data), ckpt_path=ckpt_path)
        return recorder

    full = fit().keys
    assert [len(full[e]) for e in (0, 1)] == [6, 6]
    first = fit(max_steps=3).keys
    assert first[0] == full[0][:3]
    ckpt = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    rest = fit(ckpt_path=str(ckpt)).keys
    assert sorted(rest[0]) == sorted(full[0][3:])  # the rest of the interrupted epoch, no repeats
    assert rest[1] == full[1]


def test_resampled_sources_mix_by_weight(tmp_path: Path) -> None:
    from ldm.data.datamodule import ShardDataModule

    write_shards(tmp_path / "a", sizes=(10,), prefix="a")
    write_shards(tmp_path / "b", sizes=(5, 5), prefix="b")
    mix = [{"shards": str(tmp_path / "a"), "weight": 3}, {"shards": str(tmp_path / "b"), "weight": 1}]
    dm = ShardDataModule(train_shards=mix, val_shards=None, resolution=8, batch_size=4, num_workers=0,
                         shuffle_buffer=0, mode="resampled", epoch_length=50)
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    from_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert len(keys) == 200 and 0.65 < from_a < 0.85
    with pytest.raises(ValueError, match="weights apply to data.mode=resampled"):
        ShardDataModule(train_shards=mix, val_shards=None, mode="finite").setup("fit")
