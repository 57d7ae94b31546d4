"""Aspect buckets as users run them: non-square shards, 2 CPU ranks with loader workers, vae -> ldm -> sample.py."""

import csv
import json

import pytest
from PIL import Image

from .conftest import run_script
from .test_end_to_end import USER_DATA

BUCKETS = "[[16,24],[16,16],[24,16]]"  # multiples of 8: the tiny autoencoder's 2 x the tiny UNet's 4
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.limit_val_batches=1"]


def test_bucketed_two_rank_run_then_samples_at_two_aspect_ratios(tmp_path, capsys):
    from ldm.data.bucket_report import main as bucket_report
    from ldm.data.shapes import write_shapes

    write_shapes(tmp_path / "wide", num_train=96, num_val=16, resolution=16, seed=1, shard_size=32, max_ratio=2.0)
    common = [*USER_DATA, *DDP, f"data.train_shards={tmp_path}/wide/train", f"data.val_shards={tmp_path}/wide/val",
              f"data.buckets={BUCKETS}", "data.mode=finite", "paths.runs=runs", "paths.exports=exports"]

    # what each rank's loader yields: the same batch count on both, one shape per batch
    result = bucket_report(["--shards", f"{tmp_path}/wide/train", "--buckets", BUCKETS, "--resolution", "16",
                            "--batch-size", "8", "--world-size", "2", "--num-workers", "2"])
    assert result["batches"] == [6, 6] and result["mixed"] == 0
    assert sum(result["histogram"].values()) == 96 and len(result["histogram"]) == 3
    assert "batches holding more than one shape: 0" in capsys.readouterr().out

    # stage=vae, one full epoch (6 batches per rank): the bucket shares are summed over ranks at its end
    run_script("train.py", "stage=vae", *common, "trainer.max_steps=6",
               "trainer.val_check_interval=6", cwd=tmp_path)
    run = next((tmp_path / "runs" / "vae").iterdir())
    steps = json.loads((run / "summary.json").read_text())["optimizer_steps_per_rank"]
    assert steps[0] == steps[1] and steps[0][0] == 6  # autoencoder steps (the discriminator starts later)
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    shares = {k: float(r[k]) for r in rows for k in r if k.startswith("data/bucket_") and r[k]}
    assert set(shares) == {"data/bucket_16x24", "data/bucket_16x16", "data/bucket_24x16"}
    assert sum(shares.values()) == pytest.approx(1.0, rel=1e-6)
    assert {k.removeprefix("data/bucket_"): v for k, v in shares.items()} == pytest.approx({
        k: n / 96 for k, n in result["histogram"].items()}, rel=1e-6)  # the loader report and the training logs agree

    # stage=ldm on the same buckets, then samples at two aspect ratios
    run_script("train.py", "stage=ldm", *common, "trainer.max_steps=2", "trainer.val_check_interval=2",
               "stage.num_val_prompts=2", "stage.module.num_inference_steps=2", cwd=tmp_path)
    export = next((tmp_path / "runs" / "ldm").glob("*/export"))
    for height, width in ((16, 24), (24, 16)):
        run_script("sample.py", f"ckpt={export}", "prompt=a red circle on a blue background", f"height={height}",
                   f"width={width}", "steps=2", f"out=s{height}x{width}", "progress=false", cwd=tmp_path)
        assert Image.open(tmp_path / f"s{height}x{width}" / "00000.png").size == (width, height)
