"""Two CPU ranks (gloo): both run, and both write into the one Hydra run directory, also under -m.

stage=vae runs with the discriminator active from the first step, so both optimizers step under DDP.
"""

import json

import pytest

from .conftest import run_scripts_together
from .test_end_to_end import USER_DATA

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=2",
       "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shapes) -> dict[bool, object]:
    """The plain and the -m run side by side, each in its own dir: Lightning starts rank 1 only once rank 0 has
    imported everything, so one run alone keeps one of the 2 cores idle for its first ~10 s."""
    data = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    args = ["stage=vae", *USER_DATA, *data, *DDP, "paths.runs=runs", "paths.exports=exports",
            "stage.module.loss.disc_start=0", "stage.module.loss.disc_num_layers=1"]
    dirs = {multirun: tmp_path_factory.mktemp("multirun" if multirun else "run") for multirun in (False, True)}
    run_scripts_together(("train.py", args, dirs[False], True), ("train.py", ["-m", *args, "seed=3"], dirs[True], True))
    return dirs


@pytest.mark.parametrize("multirun", [False, True])
def test_ddp_ranks_share_the_run_dir(runs, multirun):
    tmp_path = runs[multirun]
    if multirun:
        jobs = list((tmp_path / "runs" / "multirun").glob("*/*/"))
        assert len(jobs) == 1, jobs  # the child rank did not start a sweep of its own
        run_dir = jobs[0]
    else:
        runs = list((tmp_path / "runs" / "vae").iterdir())
        assert len(runs) == 1, runs
        run_dir = runs[0]
    assert (run_dir / "train_rank1.log").exists()  # rank 1's Hydra job log sits beside rank 0's
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "exports" / "autoencoder" / "autoencoder.safetensors").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    # Both ranks stepped the autoencoder and the discriminator optimizer once per batch, the same number of times.
    assert summary["optimizer_steps_per_rank"] == [[2, 2], [2, 2]], summary
    assert summary["global_step"] == 2
