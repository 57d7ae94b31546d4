"""No host synchronisation in the training step: N steps of stage=vae and of stage=ldm, through train(), read the
device only at the logging steps (every trainer.log_every_n_steps), as a GPU run would (tests/host_reads.py)."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from ldm.autoencoder.model import AutoencoderKL
from ldm.train import cli

from .conftest import ROOT
from .host_reads import HostReadCounter, counting

STEPS, EVERY = 12, 4


# Reads of tensors that are host tensors on a GPU run too (they wait for nothing): stage 2's caption dropout
# is drawn from the step's CPU generator (ldm.train.rng) and turned into the list of captions to encode.
HOST_SIDE = (("Tensor.tolist", "diffusion/module.py", "diffusion_loss"),)


def _train(tmp_path, monkeypatch, *overrides: str) -> HostReadCounter:
    counter = HostReadCounter(exempt=HOST_SIDE)

    class CountingTrainer(pl.Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[counter, *(callbacks or [])], **kwargs)

    monkeypatch.setattr(cli.pl, "Trainer", CountingTrainer)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[
            "logger=csv", "trainer.accelerator=cpu", f"trainer.max_steps={STEPS}",
            f"trainer.log_every_n_steps={EVERY}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=true",
            "checkpoint.every_n_train_steps=1000", "data.resolution=16", "data.batch_size=4",
            "model.autoencoder.ch=16", "model.unet.model_channels=16", "model.unet.num_head_channels=16",
            "model.text_encoder.width=32", "model.text_encoder.layers=1", *overrides])
    with counting(counter):
        cli.train(cfg)
    return counter


def _report(counter: HostReadCounter, stage: str) -> str:
    sites = "\n".join(f"  {n:3d} {kind} at {site}" for (kind, site), n in counter.sites.most_common())
    return (f"stage={stage}: {counter.total} host reads/collectives in {STEPS} steps (log every {EVERY}), "
            f"{counter.logged_numbers} Python numbers logged (steps {sorted(set(counter.logged_steps))}); per step "
            f"{dict(sorted(counter.per_step.items()))}; host-side, not counted: {dict(counter.exempted)}\n{sites}")


def _check(counter: HostReadCounter, stage: str) -> None:
    report = _report(counter, stage)
    print(report)
    if os.environ.get("HOST_READS_TRACE"):
        for step, kind, chain in counter.trace:
            print(f"  step {step}: {kind} at {chain}")
    # Lightning counts a step done once its update ran: the loggers read at global steps EVERY, 2 EVERY, ...,
    # i.e. in the step whose on_train_batch_start saw global_step EVERY-1, 2 EVERY-1, ...
    logging = {s for s in range(STEPS) if (s + 1) % EVERY == 0}
    quiet = {s: n for s, n in counter.per_step.items() if s not in logging}
    assert not quiet, f"host reads outside the logging steps {sorted(logging)}:\n{report}"
    # The throughput monitor's host timings are Python numbers by nature; it logs them with the loggers' window.
    assert set(counter.logged_steps) <= logging, f"Python numbers logged in the step (a host-to-device copy):\n{report}"
    assert counter.total > 0, "the counter saw nothing: the loggers' own reads should show"


def test_stage_vae_reads_the_device_once_per_logging_window(tmp_path, tiny_shapes, monkeypatch, one_thread):
    counter = _train(tmp_path, monkeypatch, "stage=vae", f"data.train_shards={tiny_shapes}/train",
                     f"data.val_shards={tiny_shapes}/val", "paths.exports=exports",
                     "stage.module.image_log_every=0")  # an image grid every 500 steps comes to the host by design
    _check(counter, "vae")


def test_stage_ldm_reads_the_device_once_per_logging_window(tmp_path, tiny_shapes, monkeypatch, one_thread):
    torch.manual_seed(0)
    AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=16,
                  norm_num_groups=4).save_pretrained(tmp_path / "exports" / "autoencoder")
    counter = _train(tmp_path, monkeypatch, "stage=ldm", f"data.train_shards={tiny_shapes}/train",
                     f"data.val_shards={tiny_shapes}/val", "paths.exports=exports",
                     "stage.module.scale_factor=1.0")
    _check(counter, "ldm")


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
