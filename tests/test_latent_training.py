"""stage=ldm from precomputed latent shards (data=latents): trains without the encoder, refuses a foreign one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.autoencoder.model import AutoencoderKL
from ldm.data.latents import encode_shards

from .conftest import run_scripts_together
from .test_end_to_end import TINY


def _autoencoder(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=16,
                         norm_num_groups=4).save_pretrained(path)


def test_ldm_trains_from_latent_shards(tmp_path, tiny_shapes):
    torch.set_num_threads(1)
    ae = _autoencoder(tmp_path / "exports" / "autoencoder", seed=0)
    for split in ("train", "val"):
        encode_shards(ae, tiny_shapes / split, tmp_path / "latents" / split, resolution=16, batch_size=16,
                      progress=False)
    common = [*(o for o in TINY if not o.startswith("model.autoencoder")), "stage=ldm", "data=latents",
              f"data.train_shards={tmp_path}/latents/train", f"data.val_shards={tmp_path}/latents/val",
              "paths.runs=runs", "paths.exports=exports", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "stage.num_val_prompts=2", "stage.module.num_inference_steps=2",
              "stage.module.metrics.num_samples=4"]
    other = _autoencoder(tmp_path / "other", seed=1)
    # The training run and the refused start side by side (the latter in its own runs dir: Hydra names run dirs by
    # the second they start in).
    _, proc = run_scripts_together(
        ("train.py", common, tmp_path, True),
        ("train.py", [*common, f"model.autoencoder.init_from={other}", "paths.runs=runs-refused"], tmp_path, False))
    summary = json.loads(next((tmp_path / "runs" / "ldm").glob("*/summary.json")).read_text())
    assert summary["global_step"] == 2 and summary["metrics"]["val/fid"] > 0
    # A start-up check like the others: one error line and exit status 2, no traceback.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "latent shards were made by autoencoder" in errors[0]
    assert "Traceback" not in proc.stderr
