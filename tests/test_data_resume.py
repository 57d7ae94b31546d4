"""Resume a finite epoch on another number of ranks or workers: coverage from the consumed-keys logs.

Each part of a run is a real Lightning fit in a fresh interpreter (DDP over gloo, ranks forked, DataLoader
workers on), on tests/test_data_dist.py's uneven shards (52 samples).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from ldm.checkpoints.files import load_torch_file
from ldm.data import resume
from ldm.data.coverage import coverage, effective, read_log, shard_keys
from ldm.data.pipeline import shuffled
from tests.conftest import ROOT
from tests.test_data_dist import SIZES, write_shards

SEED = 3


def _fit_part(config: dict) -> None:
    """One part of a run (in its own interpreter): fit until max_steps / max_epochs, checkpoint every `every`."""
    from datetime import timedelta

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import DDPStrategy

    from ldm.data.datamodule import ShardDataModule
    from tests.conftest import TinyImageModule

    torch.set_num_threads(1)
    root = Path(config["root"])
    data = ShardDataModule(train_shards=str(root / "s"), val_shards=None, resolution=8,
                           batch_size=config.get("batch", 4), num_workers=config["workers"],
                           shuffle_buffer=config.get("buffer", 8), seed=SEED, mode=config.get("mode", "finite"),
                           consumed_log=str(root / "log"), epoch_length=config.get("epoch_length"),
                           buckets=config.get("buckets"))
    devices = config["devices"]
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=config["every"], save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=config.get("max_steps", -1),
                         max_epochs=config.get("max_epochs", 1), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint], limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=root)
    ckpt = config.get("ckpt")
    trainer.fit(TinyImageModule(), datamodule=data, ckpt_path=str(root / "ckpt" / ckpt) if ckpt else None)


def _part(root: Path, **config) -> None:
    code = "import json, sys; from tests.test_data_resume import _fit_part; _fit_part(json.loads(sys.argv[1]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps({"root": str(root), **config})], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _report(root: Path) -> dict:
    return coverage(read_log([root / "log"]), shard_keys(str(root / "s")))


def test_resume_two_ranks_on_one(tmp_path: Path) -> None:
    """2 ranks x 2 workers stop at step 2; 1 rank x 2 workers (another buffer) finishes the epoch and one more."""
    write_shards(tmp_path / "s")
    _part(tmp_path, devices=2, workers=2, max_steps=2, every=2)
    state = load_torch_file(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")["ShardDataModule"]
    # gathered from both ranks: each of the 4 workers delivered one batch of 4, nothing held
    assert state["cursors"] == [4, 4, 4, 4] and state["consumed_batches"] == [1, 1, 1, 1]
    assert state["held"] == [[], [], [], []] and state["plan"].tolist() == [[0, 52]]
    _part(tmp_path, devices=1, workers=2, buffer=5, every=100, max_epochs=2, ckpt="epoch=0-step=2.ckpt")
    report = _report(tmp_path)
    # 16 used before the stop, 36 left: 9 batches of 4 on one rank, nothing dropped
    assert report[0] == {"batches_per_rank": {0: 2 + 9, 1: 2}, "used": 52, "twice": 0, "never": 0}
    # then a normal epoch of the new layout: 52 // 4 = 13 batches
    assert report[1] == {"batches_per_rank": {0: 13}, "used": 52, "twice": 0, "never": 0}
    steps = [r["step"] for r in effective(read_log([tmp_path / "log"]))]
    assert max(steps) == 2 + 9 + 13  # Lightning ran exactly the batches the resumed epoch had left


def test_resume_one_rank_on_three(tmp_path: Path) -> None:
    """1 rank x 2 workers stops at step 5; 3 ranks x 1 worker finish: 32 left, 24 dealt, 8 (< 3 x 4) dropped."""
    write_shards(tmp_path / "s")
    _part(tmp_path, devices=1, workers=2, max_steps=5, every=5)
    _part(tmp_path, devices=3, workers=1, every=100, ckpt="epoch=0-step=5.ckpt")
    report = _report(tmp_path)
    assert report[0] == {"batches_per_rank": {0: 5 + 2, 1: 2, 2: 2}, "used": 44, "twice": 0, "never": 8}


def test_two_changes_in_one_epoch(tmp_path: Path) -> None:
    """2 ranks -> 3 ranks x 2 workers (one step) -> 1 rank: every sample of the epoch once."""
    write_shards(tmp_path / "s")
    _part(tmp_path, devices=2, workers=1, max_steps=2, every=2)
    _part(tmp_path, devices=3, workers=2, max_steps=3, every=3, ckpt="epoch=0-step=2.ckpt")
    _part(tmp_path, devices=1, workers=1, every=100, ckpt="epoch=0-step=3.ckpt")
    report = _report(tmp_path)
    # 16 + 12 (36 left: 3 batches per rank, one trained) + 24 (6 batches)
    assert report[0] == {"batches_per_rank": {0: 2 + 1 + 6, 1: 2 + 1, 2: 1}, "used": 52, "twice": 0, "never": 0}


def test_bucketed_resume_two_ranks_on_one(tmp_path: Path) -> None:
    """Aspect buckets: samples waiting in a bucket queue at the checkpoint are neither lost nor trained twice."""
    from tests.test_data_buckets import BUCKETS, write_ratio_shards

    write_ratio_shards(tmp_path / "s")
    buckets = [list(b) for b in BUCKETS]
    _part(tmp_path, devices=2, workers=2, max_steps=2, every=2, buckets=buckets)
    state = load_torch_file(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")["ShardDataModule"]
    held = [p for h in state["held"] for p in h]
    assert held, "the test must stop while bucket queues hold samples"
    before = {k for r in read_log([tmp_path / "log"]) for k in r.get("keys", [])}
    _part(tmp_path, devices=1, workers=1, every=100, ckpt="epoch=0-step=2.ckpt", buckets=buckets)
    records = effective(read_log([tmp_path / "log"]))
    after = [k for r in records if r["step"] > 2 for k in r["keys"]]
    assert not before & set(after)
    order, key_at = resume.shard_order(len(SIZES), SEED, 0), []
    for shard in order:  # global position -> key in epoch 0's end-to-end shard order
        key_at += [f"s{shard}_{i:04d}" for i in range(SIZES[shard])]
    held_keys = {key_at[p] for p in held}
    assert not held_keys & before  # held = pulled but not trained
    assert held_keys & set(after)  # and the resumed part trains them
    everything = shard_keys(str(tmp_path / "s"))
    # what was never used is what bucketing drops (fewer than batch per non-padded bucket) plus the global
    # remainder of the new layout: at most (3 - 1) * 4 + 4 on one rank with one worker
    assert len(everything - before - set(after)) <= (len(BUCKETS) - 1) * 4 + 4


def _corrupt(url: str, key: str) -> None:
    with tarfile.open(url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(url, "w") as tar:
        for name, data in members:
            data = b"not a png" if name == f"{key}.png" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_same_layout_resume_after_an_undecodable_sample(tmp_path: Path) -> None:
    """The cursor is recorded, not assumed to be batches x batch_size: no sample trained in both parts."""
    urls = write_shards(tmp_path / "s")
    first = resume.shard_order(len(SIZES), SEED, 0)[0]
    _corrupt(urls[first], f"s{first}_0001")  # epoch 0, position 1: rank 0's second sample (no shuffle buffer)
    _part(tmp_path, devices=2, workers=1, buffer=0, max_steps=2, every=2)
    before = {k for r in read_log([tmp_path / "log"]) for k in r.get("keys", [])}
    _part(tmp_path, devices=2, workers=1, buffer=0, every=100, ckpt="epoch=0-step=2.ckpt")
    records = effective(read_log([tmp_path / "log"]))
    after = [k for r in records if r["step"] > 2 for k in r["keys"]]
    assert not before & set(after)  # the old skip (8 raw samples) trained position 8 again
    report = _report(tmp_path)[0]
    # 48 dealt, 1 undecodable (its consumer pads one repeat, the only sample used twice), 4 left out
    assert report == {"batches_per_rank": {0: 6, 1: 6}, "used": 47, "twice": 1, "never": 5}


def test_pending_and_replan_cover_the_plan() -> None:
    """Trained prefix of every consumer's shuffled slice + what is pending = the whole plan, disjoint."""
    rng = random.Random(0)
    for _ in range(30):
        old = resume.Layout(rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 5), rng.choice([0, 1, 4, 9]))
        plan = resume.to_runs(sorted(rng.sample(range(200), rng.randint(old.consumers * old.batch_size, 150))))
        per_rank = resume.run_length(plan) // (old.world_size * old.batch_size)

        def order(c: int, positions: list[int], old=old) -> list[int]:
            return list(shuffled(positions, old.shuffle_buffer, resume.shuffle_rng(1, 0, c, old.consumers)))

        used, cursors, held = [], [], []
        for c in range(old.consumers):
            a, b = resume.consumer_slice(per_rank, c // old.workers, c % old.workers, old.workers, old.batch_size)
            out = order(c, list(resume.positions(resume.take(plan, a, b))))
            cursor = rng.randint(0, len(out))
            keep = rng.randint(0, cursor)  # the last ones pulled still held by a batcher
            used += out[:keep]
            held.append(out[keep:cursor])
            cursors.append(cursor)
        left = resume.pending(plan, per_rank, old, cursors, held, order)
        assert sorted(used + left) == list(resume.positions(plan))
        new = resume.Layout(rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 5), 3)
        runs, new_per_rank, dropped = resume.replan(left, new)
        assert resume.run_length(runs) == len(left) and 0 <= dropped < new.world_size * new.batch_size
        assert new_per_rank * new.world_size * new.batch_size + dropped == len(left)


def test_coverage_drops_lines_a_resume_redid() -> None:
    records = [{"step": s, "epoch": 0, "rank": 0, "keys": [f"k{s}"], "time": float(s)} for s in (1, 2, 3)]
    records += [{"resume": 2, "epoch": 0, "rank": 0, "time": 10.0},
                {"step": 3, "epoch": 0, "rank": 0, "keys": ["k3"], "time": 11.0}]
    assert coverage(records, {"k1", "k2", "k3", "k4"})[0] == {"batches_per_rank": {0: 3}, "used": 3, "twice": 0,
                                                               "never": 1}
    assert Counter(k for r in records if "keys" in r for k in r["keys"])["k3"] == 2  # raw log has the redo


def test_resampled_mode_says_what_it_does(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One start-up line on what the mode does; on another worker count, the epoch's rest from fresh streams."""
    write_shards(tmp_path / "s")
    caplog.set_level(logging.INFO, logger="ldm.data.datamodule")
    resampled = {"devices": 1, "mode": "resampled", "epoch_length": 6}
    _fit_part({"root": str(tmp_path), **resampled, "workers": 1, "max_steps": 2, "every": 2})
    lines = [r.getMessage() for r in caplog.records if "data.mode=resampled" in r.getMessage()]
    assert len(lines) == 1 and "does not use each sample once" in lines[0]
    caplog.clear()
    _fit_part({"root": str(tmp_path), **resampled, "workers": 2, "every": 100, "ckpt": "epoch=0-step=2.ckpt"})
    lines = [r.getMessage() for r in caplog.records if "data.mode=resampled" in r.getMessage()]
    assert len(lines) == 2 and "the rest of epoch 0 (4 batches per rank) comes from fresh streams" in lines[1]
    assert _report(tmp_path)[0]["batches_per_rank"] == {0: 6}
