"""wandb offline: one run per training run (a resume continues it), grids with captions, throughput keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT
from .test_end_to_end import TINY


def train(*overrides: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", OMP_NUM_THREADS="1", HOME=str(cwd))  # HOME: no ~/.netrc API key here
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_offline_run_is_resumed_and_syncable(tmp_path, tiny_shapes):
    common = [o for o in TINY if not o.startswith("logger=")] + [
        "stage=vae", "logger=wandb", f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
        "paths.runs=runs", "paths.exports=exports", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    train(*common, "trainer.max_steps=2", cwd=tmp_path)
    train(*common, "trainer.max_steps=4", "ckpt=last", cwd=tmp_path)

    runs = sorted((tmp_path / "runs" / "vae").iterdir())
    assert len(runs) == 2
    ids = [(run / "wandb_run_id").read_text().strip() for run in runs]
    assert ids[0] == ids[1]  # the resumed job continues the first job's wandb run
    offline = [next((run / "wandb").glob(f"offline-run-*-{ids[0]}")) for run in runs]
    images = list((offline[0] / "files" / "media" / "images").rglob("*.png"))
    assert images, "no image grid was logged"
    record = next(offline[0].glob("*.wandb")).read_bytes()
    for key in (b"top: inputs, bottom: reconstructions", b"perf/images_per_sec", b"perf/data_wait_fraction",
                b"train/loss", b"overrides"):
        assert key in record, key
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(offline[1])],
                          capture_output=True, text=True, env={**env, "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0 and ids[0] in proc.stdout + proc.stderr, proc.stdout + proc.stderr
