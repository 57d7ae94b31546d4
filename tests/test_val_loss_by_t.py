"""Validation loss by noise level: stratified timesteps, noise per sample key, sums reduced over ranks.

The values depend on the weights and the validation data alone: not on the batch size, the world size, or
whether the run was resumed.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.val_loss import keyed_noise, quantile_timesteps
from tests.ldm_factory import tiny_ldm

from .conftest import randomize, run_script, run_scripts_together


def test_buckets_are_equal_probability_slices_of_training_timesteps():
    t, names = quantile_timesteps(NoiseSchedule(num_train_timesteps=1000), 5)
    assert t.tolist() == [100, 300, 500, 700, 900]
    assert names == ["t000-199", "t200-399", "t400-599", "t600-799", "t800-999"]
    flow = FlowSchedule(logit_mean=0.0, logit_std=1.0, shift=3.0)
    t, names = quantile_timesteps(flow, 5)
    drawn = flow.sample_timesteps(200_000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    # Each midpoint is the (k + 1/2)/5 quantile of what training draws, inside its named range.
    for k, value in enumerate(t.tolist()):
        assert (drawn < value).float().mean().item() == pytest.approx((k + 0.5) / 5, abs=0.005)
        lo, hi = (float(x) for x in names[k][1:].split("-"))
        assert lo <= value <= hi
    assert names[0].startswith("t0.00-") and names[-1].endswith("-1.00")


def test_noise_follows_the_key_not_the_batch():
    a = keyed_noise(["x", "y", "z"], (2, 3), seed=0)
    b = keyed_noise(["z", "x"], (2, 3), seed=0)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(keyed_noise(["x"], (2, 3), seed=1)[0], a[0])


class Keyed(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image, "caption": f"caption {i % 3}", "key": f"{i:06d}"}


def _validate(prediction_type: str, batch_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    module = tiny_ldm(prediction_type=prediction_type, sampler="euler" if prediction_type == "flow" else "ddim")
    randomize(module.ema.model, seed=1, std=0.1)  # a fresh UNet's zero output layer predicts 0 at every t
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = DataLoader(Keyed(), batch_size=batch_size, shuffle=False, num_workers=1)
    (metrics,) = trainer.validate(module, loader, verbose=False)
    return {k: float(v) for k, v in metrics.items() if k.startswith("val/loss")}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_same_values_whatever_the_batching(prediction_type):
    whole, split = _validate(prediction_type, 6), _validate(prediction_type, 4)  # one batch; a batch of 4, one of 2
    assert len(whole) == 6 and "val/loss" in whole  # the mean and 5 buckets
    assert whole == pytest.approx(split, rel=1e-5)
    buckets = [v for k, v in whole.items() if k.startswith("val/loss_by_t/")]
    assert sum(buckets) / 5 == pytest.approx(whole["val/loss"], rel=1e-6)
    assert len(set(buckets)) == 5  # the noise levels differ, so do their losses


# ---------------------------------------------------------------------------------------------- through train.py
PIXEL = ["logger=csv", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "data.resolution=16",
         "data.batch_size=4", "data.val_batch_size=5", "data.num_workers=2", "model/autoencoder=identity",
         "model.unet.model_channels=16", "model.unet.num_head_channels=8", "model.text_encoder.width=32",
         "paths.runs=runs", "checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=1.0",
         "trainer.val_check_interval=2", "trainer.max_steps=2", "+trainer.num_sanity_val_steps=0"]


def _val_metrics(run_dir) -> dict[str, float]:
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if k.startswith("val/loss")}


def test_same_values_on_one_and_two_ranks_and_after_resume(tmp_path, tiny_shapes):
    """One rank trains 2 steps and validates; two ranks validate its step-2 checkpoint; one rank resumes from step 1
    and validates at step 2. All three log the same values (flow, the shapes recipe's objective)."""
    data = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    run_script("train.py", "stage=ldm", *PIXEL, *data, "hydra.run.dir=runs/one", cwd=tmp_path)
    one = _val_metrics(tmp_path / "runs" / "one")
    ckpts = tmp_path / "runs" / "one" / "checkpoints"
    run_scripts_together(
        ("train.py", ["stage=ldm", *PIXEL, *data, "hydra.run.dir=runs/two", "trainer.devices=2", "trainer.strategy=ddp",
                      f"ckpt={ckpts / 'step0000002.ckpt'}"], tmp_path, True),
        ("train.py", ["stage=ldm", *PIXEL, *data, "hydra.run.dir=runs/resumed", f"ckpt={ckpts / 'step0000001.ckpt'}"],
         tmp_path, True))
    two, resumed = _val_metrics(tmp_path / "runs" / "two"), _val_metrics(tmp_path / "runs" / "resumed")
    assert len(one) == 6 and one["val/loss"] > 0, one
    assert two == pytest.approx(one, rel=1e-5)
    assert resumed == pytest.approx(one, rel=1e-4)  # resumed training: the weights agree to float summation order
    # Batches of 5 over 24 samples: 5 batches on one rank, 12 samples (3 batches, one partial) on each of two.
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step0000002.ckpt") and summary["global_step"] == 2
