"""Aspect-ratio buckets: one shape per batch, equal batch counts, no repeats in finite mode, exact resume."""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.data.buckets import (
    Bucketer,
    bucket_name,
    check_bucket_factor,
    generate_buckets,
    nearest_bucket,
    parse_buckets,
    probe_size,
)
from ldm.data.decode import DecodeOptions, load_image_sized
from ldm.data.pipeline import TrainStream, ValStream, expand_shards, finite_batches, shard_counts

BUCKETS = [(8, 16), (16, 16), (16, 8)]  # (height, width)
# (width, height) of the stored images: wide, square, tall and in-between; bucketed by aspect ratio
SIZES_WH = [(24, 12), (12, 12), (12, 24), (20, 14), (14, 20), (16, 16)]
SHARD_SIZES = (7, 13, 20, 3, 9)
BATCH, WORLD, WORKERS = 4, 2, 2


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ratio_shards(root: Path, sizes: tuple[int, ...] = SHARD_SIZES, json_sizes: bool = True,
                       seed: int = 0, broken: set[str] = frozenset()) -> list[str]:
    """Non-square PNG shards as img2dataset --resize_mode keep_ratio writes them (json width/height/original_*).

    Keys in `broken` get bytes that are no image (with a json size, so they are bucketed and fail at decode).
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s, n in enumerate(sizes):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                key = f"s{s}_{i:04d}"
                width, height = rng.choice(SIZES_WH)
                png = io.BytesIO()
                Image.new("RGB", (width, height), (s * 40, i * 10 % 256, 7)).save(png, format="PNG")
                _add(tar, f"{key}.png", b"not an image" if key in broken else png.getvalue())
                _add(tar, f"{key}.txt", f"shard {s} sample {i}".encode())
                if json_sizes:
                    meta = {"key": key, "width": width, "height": height,
                            "original_width": width * 10, "original_height": height * 10}
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n}))
        urls.append(str(path))
    return urls


def _keys(sizes: tuple[int, ...]) -> set[str]:
    return {f"s{s}_{i:04d}" for s, n in enumerate(sizes) for i in range(n)}


def _shape(batch: dict) -> tuple[int, int]:
    return tuple(batch["image"].shape[2:])


# ---------------------------------------------------------------------------------------------
# The bucket list, placement and cropping


def test_generated_buckets_respect_step_area_and_ratio() -> None:
    buckets = generate_buckets(256 * 256, 64, 2.0)
    assert (256, 256) in buckets and (192, 320) in buckets and (320, 192) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and max(h / w, w / h) <= 2.0 and h * w <= 256 * 256
    assert parse_buckets({"step": 64, "max_ratio": 2.0}, 256) == buckets  # area defaults to resolution ** 2
    assert parse_buckets(None, 256) is None
    assert parse_buckets([[16, 8], [8, 16]], 16) == [(8, 16), (16, 8)]


@pytest.mark.parametrize("spec", ["16x16", [[16]], [[16, 0]], [[8, 8], [8, 8]], {"stepp": 8}, {"step": 8, "x": 1}])
def test_bad_bucket_specs_name_the_key(spec) -> None:
    with pytest.raises(ValueError, match="data.buckets"):
        parse_buckets(spec, 16)


def test_bucket_sides_must_suit_the_model() -> None:
    check_bucket_factor([(16, 32)], 8, "autoencoder factor 4 x UNet downsampling 2")
    with pytest.raises(ValueError, match="data.buckets: 16x36 is not a multiple of 8"):
        check_bucket_factor([(16, 36)], 8, "autoencoder factor 4 x UNet downsampling 2")


def test_nearest_bucket_by_log_ratio() -> None:
    assert nearest_bucket(24, 12, BUCKETS) == 0  # wide -> 8x16
    assert nearest_bucket(12, 12, BUCKETS) == 1
    assert nearest_bucket(12, 24, BUCKETS) == 2
    # 1.45:1 is nearer 2:1 than 1:1 on a log scale (log 1.45 = 0.37 > log 2 / 2 = 0.35) though not linearly
    assert nearest_bucket(145, 100, BUCKETS) == 0
    assert nearest_bucket(140, 100, BUCKETS) == 1


def test_size_from_json_else_header() -> None:
    png = io.BytesIO()
    Image.new("RGB", (30, 10)).save(png, format="PNG")
    assert probe_size({"png": png.getvalue(), "json": b'{"width": 7, "height": 5}'}) == (7, 5)
    assert probe_size({"png": png.getvalue()}) == (30, 10)
    assert probe_size({"png": b"garbage"}) is None


def test_cover_resize_and_crop_offsets() -> None:
    png = io.BytesIO()
    Image.new("RGB", (40, 10), (200, 0, 0)).save(png, format="PNG")
    options = DecodeOptions(resolution=16)
    image, crop, stored = load_image_sized(png.getvalue(), options, (8, 16))  # 40x10 -> 32x8, centre crop 16 wide
    assert image.shape == (3, 8, 16) and crop == (0, 8) and stored == (10, 40)
    rand = DecodeOptions(resolution=16, crop="random")
    offsets = {load_image_sized(png.getvalue(), rand, (8, 16), random.Random(i))[1] for i in range(20)}
    assert all(top == 0 and 0 <= left <= 16 for top, left in offsets) and len(offsets) > 3


def test_bucketer_leftovers_are_largest_first_and_held_lists_positions() -> None:
    bucketer = Bucketer(BUCKETS, 4)
    for pos, bucket in enumerate([0, 0, 0, 1, 2, 2, 0]):  # bucket 0 fills at its 4th sample
        full = bucketer.add({"__pos__": pos}, bucket)
        assert (full is not None) == (pos == 6)
    assert sorted(bucketer.held()) == [3, 4, 5]
    batches, dropped = bucketer.leftovers(1)
    assert [b for b, _ in batches] == [2] and dropped == 1 and bucketer.held() == []


def test_restore_from_held_positions_rebuilds_the_same_queues(tmp_path: Path) -> None:
    """The data position's `held` list (h-resume's cursor skip) rebuilds exactly the interrupted queues."""
    from ldm.data.shards import read_samples

    urls = write_ratio_shards(tmp_path / "s", sizes=(20,))
    raw = [dict(s, __pos__=i) for i, s in enumerate(read_samples(urls[0], lambda ext: True))]
    live = Bucketer(BUCKETS, 4)
    cursor = 13
    for sample in raw[:cursor]:
        live.add(sample, live.assign(sample))
    held = live.held()
    assert held  # some samples wait in partial buckets
    rebuilt = Bucketer(BUCKETS, 4)
    assert rebuilt.restore(raw[:cursor], held) == len(held)
    assert [[s["__key__"] for s in q] for q in rebuilt.queues] == [[s["__key__"] for s in q] for q in live.queues]


# ---------------------------------------------------------------------------------------------
# Streams


def _stream(urls: list[str], **kw) -> TrainStream:
    args = {"resolution": 16, "batch_size": BATCH, "mode": "finite", "counts": shard_counts(urls),
            "shuffle_buffer": 8, "seed": 3, "buckets": BUCKETS}
    args.update(kw)
    return TrainStream(urls, **args)


def _epoch(stream: TrainStream, workers: int = 2) -> list[dict]:
    return list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))


def test_finite_bucketed_epoch_is_exact_and_one_shape_per_batch(tmp_path: Path) -> None:
    urls = write_ratio_shards(tmp_path / "s")
    stream = _stream(urls)
    batches = _epoch(stream)
    assert len(batches) == len(stream) == finite_batches(sum(SHARD_SIZES), 1, BATCH) == 13
    keys = [k for b in batches for k in b["key"]]
    padded = sum(b["data_stats"]["padded"] for b in batches)
    dropped = sum(b["data_stats"]["dropped"] for b in batches)
    unique = set(keys)
    assert len(keys) == 13 * BATCH and len(unique) == len(keys) - padded  # only padding repeats a sample
    assert len(unique) + dropped == 13 * BATCH  # every sample of the part is batched or counted as dropped
    assert dropped > 0 and padded > 0  # the data above does leave partial buckets
    for batch in batches:
        shape = _shape(batch)
        assert shape in BUCKETS and batch["data_stats"][bucket_name(shape)] == BATCH
        assert batch["crop_top_left"].shape == batch["original_size"].shape == (BATCH, 2)
        assert batch["crop_top_left"].dtype == torch.long
    # original size comes from the json (img2dataset's original_*: 10x the stored image)
    assert all(int(v) % 10 == 0 for b in batches for v in b["original_size"].flatten())


def test_bucketed_resume_yields_the_rest_of_the_epoch(tmp_path: Path) -> None:
    """Resumed after k batches (also inside the end-of-part padding): the remaining batches, exactly."""
    urls = write_ratio_shards(tmp_path / "s")
    for mode, kw in (("finite", {}), ("resampled", {"epoch_length": 9, "counts": None})):
        full = _stream(urls, mode=mode, **kw)
        full.set_epoch(1)
        epoch = [(tuple(b["key"]), _shape(b)) for b in _epoch(full)]
        for k in (3, len(epoch) - 1):
            resumed = _stream(urls, mode=mode, **kw)
            resumed.set_epoch(1)
            resumed.resume_at(1, k)
            rest = [(tuple(b["key"]), _shape(b)) for b in _epoch(resumed)]
            # the same batches (each worker's own, in its order); the loader may interleave the workers anew
            assert sorted(rest) == sorted(epoch[k:]), (mode, k)
            for worker in range(2):
                own = [b for j, b in enumerate(epoch) if j % 2 == worker]
                assert [b for b in rest if b in own] == [b for b in own if b in epoch[k:]]


def test_bad_samples_in_buckets_are_replaced_and_counted(tmp_path: Path) -> None:
    broken = {"s1_0003", "s2_0010"}
    urls = write_ratio_shards(tmp_path / "s", broken=broken)
    # and one without any readable size: no json, no image header
    with tarfile.open(tmp_path / "s" / "00005.tar", "w") as tar:
        _add(tar, "s5_0000.png", b"no header")
        _add(tar, "s5_0000.txt", b"x")
    (tmp_path / "s" / "00005_stats.json").write_text(json.dumps({"successes": 1}))
    urls = expand_shards(str(tmp_path / "s"))
    stream = _stream(urls, shuffle_buffer=0)
    batches = _epoch(stream, workers=1)
    assert len(batches) == len(stream)
    totals = {k: sum(b["data_stats"][k] for b in batches) for k in ("skipped", "padded", "samples")}
    keys = {k for b in batches for k in b["key"]}
    assert not keys & (broken | {"s5_0000"})
    assert totals["skipped"] == 3
    assert all(len({tuple(x.shape) for x in b["image"]}) == 1 for b in batches)


def test_validation_groups_by_bucket_and_covers_every_sample(tmp_path: Path) -> None:
    urls = write_ratio_shards(tmp_path / "s", json_sizes=False)  # sizes from the image headers
    keys: list[str] = []
    for rank in range(2):
        stream = ValStream(urls, resolution=16, batch_size=BATCH, rank=rank, world_size=2, buckets=BUCKETS)
        for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2):
            assert _shape(batch) in BUCKETS and 1 <= len(batch["key"]) <= BATCH
            keys += batch["key"]
    assert len(keys) == len(set(keys)) == sum(SHARD_SIZES)


def test_square_shapes_data_stays_square_with_buckets_on(tmp_path: Path) -> None:
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", num_train=24, num_val=8, resolution=16, shard_size=12)
    dm = ShardDataModule(train_shards=str(tmp_path / "shapes/train"), val_shards=str(tmp_path / "shapes/val"),
                         resolution=16, batch_size=4, num_workers=1, mode="finite",
                         buckets={"step": 8, "max_ratio": 3.0})
    dm.setup("fit")
    assert (16, 16) in dm.buckets and len(dm.buckets) > 1
    shapes = {_shape(b) for b in dm.train_dataloader()} | {_shape(b) for b in dm.val_dataloader()}
    assert shapes == {(16, 16)}


# ---------------------------------------------------------------------------------------------
# Real DDP ranks with workers


def _rank_main(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    urls = expand_shards(f"{root}/shards")
    result = {}
    for mode, extra in (("finite", {"counts": shard_counts(urls)}), ("resampled", {"epoch_length": 5})):
        stream = TrainStream(urls, resolution=16, batch_size=BATCH, rank=rank, world_size=WORLD, shuffle_buffer=8,
                             seed=5, mode=mode, buckets=BUCKETS, **extra)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=WORKERS, persistent_workers=True)
        epochs = []
        for _ in range(2):
            batches = []
            for batch in loader:
                shapes = {tuple(x.shape) for x in batch["image"]}
                batches.append({"keys": batch["key"], "shapes": [list(s) for s in shapes],
                                "padded": batch["data_stats"]["padded"]})
                dist.all_reduce(torch.ones(1))  # a rank with fewer batches would leave the other waiting
            epochs.append(batches)
        result[mode] = epochs
    Path(root, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_ranks_two_workers_bucketed(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    write_ratio_shards(tmp_path / "shards")
    ctx = mp.start_processes(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError("DDP ranks did not finish (a hang: uneven batch counts?)")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    per_rank = finite_batches(sum(SHARD_SIZES), WORLD, BATCH)
    for mode, expected in (("finite", per_rank), ("resampled", 5)):
        for epoch in range(2):
            keys, padded = [], 0
            for rank in range(WORLD):
                batches = results[rank][mode][epoch]
                assert len(batches) == expected, (mode, rank)
                assert all(len(b["shapes"]) == 1 and tuple(b["shapes"][0][1:]) in BUCKETS for b in batches)
                keys += [k for b in batches for k in b["keys"]]
                padded += sum(b["padded"] for b in batches)
            if mode == "finite":  # nothing read twice: only padding repeats
                assert len(set(keys)) == len(keys) - padded and set(keys) <= _keys(SHARD_SIZES)


# ---------------------------------------------------------------------------------------------
# Lightning: bucket shares summed over the run


class _ShapeRecorder(pl.Callback):
    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.shapes.append(tuple(batch["image"].shape))


def test_bucket_shares_are_logged(tmp_path: Path) -> None:
    from ldm.data.callbacks import DataStatsCallback
    from ldm.data.datamodule import ShardDataModule
    from tests.conftest import TinyImageModule

    write_ratio_shards(tmp_path / "s")
    recorder = _ShapeRecorder()
    dm = ShardDataModule(train_shards=str(tmp_path / "s"), val_shards=None, resolution=16, batch_size=BATCH,
                         num_workers=2, mode="finite", buckets=[list(b) for b in BUCKETS])
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[recorder])
    trainer.fit(TinyImageModule(), datamodule=dm)
    stats = next(c for c in trainer.callbacks if isinstance(c, DataStatsCallback))
    counts = {b: stats.totals[bucket_name(b)] for b in BUCKETS}
    assert sum(counts.values()) == len(recorder.shapes) * BATCH == 13 * BATCH
    for bucket in BUCKETS:
        assert counts[bucket] == BATCH * sum(s[2:] == bucket for s in recorder.shapes)
        share = trainer.callback_metrics[f"data/{bucket_name(bucket)}"]
        assert share == pytest.approx(counts[bucket] / (13 * BATCH))


# ---------------------------------------------------------------------------------------------
# Precomputed latents keep their bucket's shape


def test_latents_keep_bucket_shapes_and_train_grouped_by_shape(tmp_path: Path) -> None:
    from ldm.autoencoder.model import AutoencoderKL
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.latents import encode_shards

    torch.manual_seed(0)
    ae = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2, resolution=16,
                       norm_num_groups=4).save_pretrained(tmp_path / "ae")
    write_ratio_shards(tmp_path / "img", sizes=(10, 14))
    info = encode_shards(ae, tmp_path / "img", tmp_path / "lat", resolution=16, batch_size=4, progress=False,
                         buckets=[list(b) for b in BUCKETS])
    recorded = json.loads((tmp_path / "lat" / "latents.json").read_text())
    assert recorded["buckets"] == [list(b) for b in BUCKETS] and recorded["latent_factor"] == 2
    assert info["num_samples"] == 24
    with pytest.raises(ValueError, match="not a multiple of 2"):
        encode_shards(ae, tmp_path / "img", tmp_path / "lat2", resolution=16, progress=False, buckets=[[9, 16]])

    dm = ShardDataModule(train_shards=str(tmp_path / "lat"), val_shards=str(tmp_path / "lat"), resolution=16,
                         batch_size=4, num_workers=1, mode="finite", latents=True, autoencoder=str(ae))
    dm.setup("fit")  # data.buckets null: the buckets the shards were written with
    assert dm.buckets == BUCKETS
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    for batch in batches:
        h, w = batch["moments"].shape[2:]
        assert (h * 2, w * 2) in BUCKETS and batch["moments"].shape[:2] == (4, 4)
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val_keys) == sorted(_keys((10, 14)))
    with pytest.raises(ValueError, match="data.buckets=.* differs from the buckets the latent shards"):
        ShardDataModule(train_shards=str(tmp_path / "lat"), val_shards=None, resolution=16, latents=True,
                        buckets=[[16, 16]]).setup("fit")


def test_compile_makes_one_graph_per_bucket_shape_beyond_the_default_limit() -> None:
    """12 shapes, more than dynamo's default recompile limit of 8: still 12 compiled graphs, none eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ldm.train.perf import compile_per_shape

    config = torch._dynamo.config
    # restored with setattr: monkeypatch's undo deletes, which hides a dynamo setting for every later test
    saved = {name: getattr(config, name) for name in ("automatic_dynamic_shapes", "recompile_limit",
                                                       "accumulated_recompile_limit", "fail_on_recompile_limit_hit")}
    try:
        _one_graph_per_shape(compile_per_shape, counters)
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        torch._dynamo.reset()


def _one_graph_per_shape(compile_per_shape, counters) -> None:
    shapes = [(8 * (1 + i % 4), 8 * (1 + i // 4)) for i in range(12)]
    compile_per_shape(len(shapes))
    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    model.compile(backend="aot_eager")
    for _ in range(2):  # the second pass must hit the cached graphs
        for h, w in shapes:
            model(torch.randn(2, 3, h, w)).sum().backward()
    assert counters["stats"]["unique_graphs"] == len(shapes)
    assert not counters["graph_break"]
