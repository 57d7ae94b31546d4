"""Stop-and-resume equals an uninterrupted run (stage=ldm and stage=vae): weights, optimizer state, EMA, step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tests.ldm_factory import tiny_ldm

# One batch per epoch: Lightning restarts a map-style loader from its first batch on resume, so longer
# epochs would feed the resumed run different data (mid-epoch data position is the data stream's job).
BATCH, BATCHES_PER_EPOCH = 4, 1


class Images(Dataset):
    """Fixed random images with captions: the same sample for the same index in every run."""

    def __len__(self) -> int:
        return BATCH * BATCHES_PER_EPOCH

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image, "caption": f"caption {i % 3}"}


def _train(module: pl.LightningModule, max_steps: int, root, ckpt_path: str | None) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, deterministic=True, default_root_dir=root)
    trainer.fit(module, DataLoader(Images(), batch_size=BATCH, shuffle=False, num_workers=2,
                                       persistent_workers=True), ckpt_path=ckpt_path)
    return trainer


def _assert_same_optimizer_state(resumed: torch.optim.Optimizer, straight: torch.optim.Optimizer) -> None:
    for key, state in straight.state_dict()["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(resumed.state_dict()["state"][key][field], value, atol=0, rtol=0)


def fit(max_steps: int, root, ckpt_path: str | None = None) -> tuple[pl.Trainer, pl.LightningModule]:
    torch.manual_seed(0)  # identical initial weights in every run
    # The lr decays from step 2 to 5, so the stop at 3 lands inside the decay window (its position must resume).
    module = tiny_ldm(scale_factor=None, prediction_type="v_prediction", warmup_steps=3, ema_decay=0.99,
                      lr_decay_fraction=0.6, lr_decay_end=5)
    return _train(module, max_steps, root, ckpt_path), module


def stop_resume_and_straight(fit_fn, tmp_path, n: int, m: int) -> tuple:
    """n steps then a checkpoint, a resumed run to n + m, and an uninterrupted one to n + m.

    Returns (first module, resumed trainer, resumed module, straight trainer, straight module)."""
    trainer, first = fit_fn(n, tmp_path / "a")
    ckpt = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.randn(1000)  # the global RNG is elsewhere after a restart; no draw may depend on it
    resumed_trainer, resumed = fit_fn(n + m, tmp_path / "b", ckpt_path=str(ckpt))
    straight_trainer, straight = fit_fn(n + m, tmp_path / "c")
    return first, resumed_trainer, resumed, straight_trainer, straight


@pytest.mark.usefixtures("one_thread")
def test_resume_matches_uninterrupted(tmp_path):
    n, m = 3, 2
    first, resumed_trainer, resumed, straight_trainer, straight = stop_resume_and_straight(fit, tmp_path, n, m)

    assert resumed_trainer.global_step == straight_trainer.global_step == n + m
    assert float(resumed.scale_factor) == float(straight.scale_factor) > 0
    assert int(resumed.ema.num_updates) == int(straight.ema.num_updates) == n + m
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    # The weights moved after the stop, so the comparison above is not of two untouched copies.
    assert not torch.equal(first.unet.out[2].weight, straight.unet.out[2].weight)
    opt_resumed, opt_straight = resumed_trainer.optimizers[0], straight_trainer.optimizers[0]
    assert opt_resumed.param_groups[0]["lr"] == opt_straight.param_groups[0]["lr"]
    _assert_same_optimizer_state(opt_resumed, opt_straight)
    sched = [t.lr_scheduler_configs[0].scheduler.state_dict()["last_epoch"]
             for t in (resumed_trainer, straight_trainer)]
    assert sched[0] == sched[1] == n + m


def fit_vae(max_steps: int, root, ckpt_path: str | None = None,
            perf: dict | None = None) -> tuple[pl.Trainer, pl.LightningModule]:
    """perf: a config `perf` section applied before training (tests/test_perf.py)."""
    from ldm.autoencoder.module import AutoencoderModule

    torch.manual_seed(0)
    # The GAN joins at step 2, so both optimizers step on both sides of the stop.
    module = AutoencoderModule(
        autoencoder=dict(embed_dim=4, z_channels=4, ch=8, ch_mult=[1, 2], num_res_blocks=1, resolution=8,
                         norm_num_groups=4),
        loss=dict(perceptual_weight=0.0, disc_start=2, disc_ndf=8, disc_num_layers=1, logvar_init=0.0),
        lr=1e-3, warmup_steps=3, image_log_every=0, metrics={"fid": {"extractor": "small", "num_features": 8}},
        seed=5)
    if perf:
        from ldm.train.perf import apply_model_perf

        apply_model_perf(module, perf)
    return _train(module, max_steps, root, ckpt_path), module


@pytest.mark.usefixtures("one_thread")
def test_autoencoder_resume_matches_uninterrupted(tmp_path):
    n, m = 3, 2
    first, resumed_trainer, resumed, straight_trainer, straight = stop_resume_and_straight(fit_vae, tmp_path, n, m)

    assert resumed_trainer.global_step == straight_trainer.global_step == n + m
    assert resumed.optimizer_steps == straight.optimizer_steps == [n + m, n + m - 2]
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert not torch.equal(first.autoencoder.decoder.conv_out.weight, straight.autoencoder.decoder.conv_out.weight)
    for opt_resumed, opt_straight in zip(resumed_trainer.optimizers, straight_trainer.optimizers, strict=True):
        _assert_same_optimizer_state(opt_resumed, opt_straight)
