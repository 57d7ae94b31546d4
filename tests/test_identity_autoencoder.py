"""model/autoencoder=identity: pixel-space diffusion through stage=ldm, with no stage-1 export."""

import json

import pytest
import torch

from ldm.autoencoder.identity import IdentityAutoencoder
from ldm.autoencoder.model import AutoencoderKL
from ldm.train.checks import ConfigError
from ldm.train.cli import build_module

from .conftest import run_script
from .test_config import compose_train
from .test_end_to_end import TINY


def test_identity_is_its_own_latent(tmp_path):
    ae = IdentityAutoencoder(in_channels=3, resolution=16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = ae.encode(x)
    assert torch.equal(post.mode(), x) and torch.allclose(post.sample(), x, atol=1e-5)
    assert torch.equal(ae.decode(x), x) and ae.downsample_factor == 1 and ae.latent_channels == 3
    loaded = AutoencoderKL.from_pretrained(ae.save_pretrained(tmp_path / "ae"))  # what a bundle holds
    assert isinstance(loaded, IdentityAutoencoder) and loaded.config == ae.config


def test_stage_ldm_trains_in_pixel_space(tmp_path, tiny_shapes):
    data = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    tiny = [o for o in TINY if not o.startswith("model.autoencoder.")]
    run_script("train.py", "stage=ldm", "model/autoencoder=identity", *tiny, *data, "paths.runs=runs",
               "paths.exports=nowhere", "trainer.max_steps=2", "trainer.limit_val_batches=0",
               "stage.module.metrics.num_samples=0", cwd=tmp_path)
    (summary,) = (tmp_path / "runs" / "ldm").glob("*/summary.json")
    assert json.loads(summary.read_text())["global_step"] == 2
    export = summary.parent / "export"
    meta = json.loads((export / "unet.json").read_text())
    assert meta["scale_factor"] == 1.0 and meta["module"]["autoencoder"]["kind"] == "identity"
    out = tmp_path / "samples"
    run_script("sample.py", f"ckpt={export}", "prompt=a red circle on a blue background", "steps=2",
               f"out={out}", cwd=tmp_path)
    assert (out / "00000.png").exists()


def test_stage_vae_refuses_the_identity():
    with pytest.raises(ConfigError, match="nothing to train"):
        build_module(compose_train("stage=vae", "model/autoencoder=identity"))
