"""WebDataset streams and the LightningDataModule on small shapes shards."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.analyze import prompt_accuracy
from ldm.data.datamodule import ShardDataModule
from ldm.data.pipeline import TrainStream, ValStream, count_samples, expand_shards
from ldm.data.shapes import write_shapes

NUM_TRAIN, NUM_VAL = 60, 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 train (4 shards) and 20 val (2 shards) images at 48 px."""
    root = tmp_path_factory.mktemp("shards")
    write_shapes(root, num_train=NUM_TRAIN, num_val=NUM_VAL, resolution=48, shard_size=16)
    return root


def _module(shards: Path, **kw) -> ShardDataModule:
    args = {
        "train_shards": str(shards / "train"),
        "val_shards": str(shards / "val"),
        "resolution": 32,
        "batch_size": 8,
        "num_workers": 0,
        "shuffle_buffer": 50,
    }
    dm = ShardDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_batches(shards: Path) -> None:
    dm = _module(shards, epoch_length=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        image = batch["image"]
        assert image.shape == (8, 3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < 0 < image.max()
        assert len(batch["caption"]) == 8 and all(isinstance(c, str) for c in batch["caption"])
        # each caption describes its own image (resized from 48 px to 32 px)
        assert prompt_accuracy(image, batch["caption"])["all"] == 1.0


def test_native_resolution(shards: Path) -> None:
    batch = next(iter(_module(shards, resolution=48, epoch_length=1).train_dataloader()))
    assert batch["image"].shape == (8, 3, 48, 48)
    assert prompt_accuracy(batch["image"], batch["caption"])["all"] == 1.0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_length_is_exact(shards: Path, num_workers: int) -> None:
    loader = _module(shards, epoch_length=5, num_workers=num_workers).train_dataloader()
    assert len(loader) == 5
    seen = []
    for _ in range(2):
        keys = [batch["key"] for batch in loader]
        assert len(keys) == 5 and all(len(k) == 8 for k in keys)
        seen += [k for batch_keys in keys for k in batch_keys]
    assert len(set(seen)) > 40  # epochs continue the stream rather than replay the same batches


def test_default_epoch_length_from_info(shards: Path) -> None:
    assert count_samples(expand_shards(shards / "train")) == NUM_TRAIN
    assert len(_module(shards).train_dataloader()) == NUM_TRAIN // 8


def test_ranks_get_equal_epochs_and_disjoint_shards(shards: Path) -> None:
    urls = expand_shards(shards / "train")
    keys = []
    for rank in range(2):
        stream = TrainStream(urls, resolution=32, batch_size=4, epoch_length=4, rank=rank, world_size=2)
        batches = list(stream)
        assert len(stream) == len(batches) == 4
        keys.append({k for b in batches for k in b["key"]})
    assert not keys[0] & keys[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_covers_every_sample_once(shards: Path, num_workers: int) -> None:
    loader = _module(shards, num_workers=num_workers, val_batch_size=6).val_dataloader()
    for _ in range(2):  # persistent workers replay the same pass
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == [f"{i:09d}" for i in range(NUM_VAL)]
        assert all(b["image"].shape[1:] == (3, 32, 32) for b in batches)


@pytest.mark.parametrize("world_size", [2, 3])  # 2 val shards: split by shard, then by sample
def test_val_ranks_are_disjoint_and_complete(shards: Path, world_size: int) -> None:
    urls = expand_shards(shards / "val")
    keys = []
    for rank in range(world_size):
        stream = ValStream(urls, resolution=32, batch_size=5, rank=rank, world_size=world_size)
        keys += [k for b in stream for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(NUM_VAL)]
    # deterministic order
    assert [b["key"] for b in ValStream(urls, resolution=32, batch_size=5)] == [
        b["key"] for b in ValStream(urls, resolution=32, batch_size=5)
    ]


def test_shard_specs(shards: Path) -> None:
    from_dir = expand_shards(shards / "train")
    from_braces = expand_shards(str(shards / "train" / "{00000..00003}.tar"))
    assert from_dir == from_braces == [str(shards / "train" / f"{i:05d}.tar") for i in range(4)]
    mixed = expand_shards([str(shards / "train" / "{00000..00001}.tar"), shards / "val"])
    assert len(mixed) == 4
    dm = _module(shards, train_shards=str(shards / "train" / "{00000..00003}.tar"), epoch_length=2)
    assert len(list(dm.train_dataloader())) == 2


def test_missing_shard_names_the_file(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="00004.tar"):
        _module(shards, train_shards=str(shards / "train" / "{00000..00005}.tar"), epoch_length=2)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        _module(shards, val_shards=str(shards / "nothing-here"), epoch_length=2)
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory"):
        _module(shards, val_shards=tmp_path, epoch_length=2)


def test_bad_values_fail_early(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resolution"):
        ShardDataModule(train_shards=str(shards / "train"), val_shards=None, resolution=0)
    with pytest.raises(ValueError, match="data.prefetch_factor must be null or an integer >= 1, got 0"):
        ShardDataModule(train_shards=str(shards / "train"), val_shards=None, prefetch_factor=0)
    # no sample counts next to the shards: epoch_length must be given
    shutil.copytree(shards / "train", tmp_path / "bare")
    with pytest.raises(ValueError, match="epoch_length"):
        _module(shards, train_shards=str(tmp_path / "bare"))


def test_loader_workers_prefetch_and_persist(shards: Path) -> None:
    dm = _module(shards, num_workers=2, prefetch_factor=3, epoch_length=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, True)
    dm = _module(shards, num_workers=0, prefetch_factor=3, epoch_length=2)  # no workers: nothing to prefetch
    dm.setup("fit")
    assert dm.train_dataloader().prefetch_factor is None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_decoding_is_image_only_and_skips_bad_samples(tmp_path: Path) -> None:
    """JPEG with no caption -> "", non-image members never decoded, broken images skipped."""
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 20), (250, 140, 20)).save(jpeg, format="JPEG")
    Image.new("RGBA", (8, 8), (30, 60, 230, 255)).save(png, format="PNG")
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", jpeg.getvalue())
        _add(tar, "a.pickle", b"\x80\x04 not to be unpickled")
        _add(tar, "b.png", b"this is not a png")
        _add(tar, "b.txt", b"broken")
        _add(tar, "c.PNG", png.getvalue())
        _add(tar, "c.txt", b"caf\xc3\xa9 \xff")
    batches = list(ValStream([str(path)], resolution=16, batch_size=4))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["key"] == ["a", "c"]
    assert batch["caption"] == ["", "café \ufffd"]
    assert batch["image"].shape == (2, 3, 16, 16)
    orange = torch.tensor([250, 140, 20]) / 127.5 - 1
    assert torch.allclose(batch["image"][0].mean((1, 2)), orange, atol=0.05)
