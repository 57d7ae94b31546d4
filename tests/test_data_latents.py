"""Latent shards: encoded once with an autoencoder, streamed back as moments, refused for another autoencoder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.autoencoder.model import AutoencoderKL
from ldm.data.datamodule import ShardDataModule
from ldm.data.latents import autoencoder_digest, encode_shards
from ldm.data.pipeline import ValStream
from ldm.data.shapes import write_shapes


def _tiny(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2, resolution=16,
                          norm_num_groups=4)
    return model.save_pretrained(path)


def test_encode_stream_and_refuse_another_autoencoder(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    write_shapes(tmp_path / "shapes", num_train=20, num_val=4, resolution=16, shard_size=8)
    ae = _tiny(tmp_path / "ae", seed=0)
    info = encode_shards(ae, tmp_path / "shapes" / "train", tmp_path / "lat", resolution=16, batch_size=8,
                         shard_size=12, progress=False)
    assert info["num_samples"] == 20 and info["latent_shape"] == [4, 8, 8]
    assert info["autoencoder_sha256"] == autoencoder_digest(AutoencoderKL.from_pretrained(ae))
    with tarfile.open(tmp_path / "lat" / "00000.tar") as tar:
        assert tar.getnames()[:2] == ["000000000.moments.npy", "000000000.txt"]

    # the moments are what the autoencoder gives for the same (decoded, resized) image
    image = next(iter(ValStream([str(tmp_path / "shapes" / "train" / "00000.tar")], resolution=16, batch_size=1)))
    model = AutoencoderKL.from_pretrained(ae).eval()
    with torch.no_grad():
        expected = model.quant_conv(model.encoder(image["image"]))[0]
    dm = ShardDataModule(train_shards=str(tmp_path / "lat"), val_shards=None, resolution=16, batch_size=4,
                         num_workers=0, mode="finite", shuffle_buffer=0, latents=True, autoencoder=str(ae))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0]["moments"].shape == (4, 4, 8, 8) and "image" not in batches[0]
    first = {k: m for b in batches for k, m in zip(b["key"], b["moments"], strict=True)}["000000000"]
    assert torch.allclose(first, expected, atol=2e-2)  # float16 storage

    other = _tiny(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="re-encode"):
        ShardDataModule(train_shards=str(tmp_path / "lat"), val_shards=None, resolution=16, batch_size=4,
                        num_workers=0, mode="finite", latents=True, autoencoder=str(other)).setup("fit")


class _LeavesAMark:
    """Unpickling this object creates a file: the side effect shows whether the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_pickled_npy_is_refused(tmp_path: Path) -> None:
    """An object-array .npy (which holds a pickle) is skipped as undecodable, never loaded."""
    marker = tmp_path / "the_pickle_ran"
    buffer = io.BytesIO()
    np.save(buffer, np.array([_LeavesAMark(marker)], dtype=object), allow_pickle=True)
    assert not marker.exists()
    np.load(io.BytesIO(buffer.getvalue()), allow_pickle=True)  # the payload works when numpy is allowed to run it
    assert marker.exists()
    marker.unlink()
    good = io.BytesIO()
    np.save(good, np.zeros((4, 2, 2), dtype=np.float16), allow_pickle=False)
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.moments.npy", buffer.getvalue()), ("a.txt", b"x"), ("b.moments.npy", good.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batches = list(ValStream([str(path)], resolution=8, batch_size=2, latents=True))
    assert not marker.exists(), "the pickled payload was loaded"
    assert [b["key"] for b in batches] == [["b"]] and batches[0]["data_stats"]["skipped"] == 1
