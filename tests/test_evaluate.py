"""python -m ldm.evaluate: the same metrics.json on 1 and 2 CPU ranks, training validation's FID at equal samples,
reference statistics computed once and reused, and a -m sweep that ends with its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from .conftest import ROOT
from .test_sample import tiny_module

# The checkpoint's own validation metric settings: evaluate uses them unless told otherwise.
METRICS = {"num_samples": 8, "fid": {"extractor": "small", "num_features": 16}, "clip_score": {"model_name": None}}
RUN = ["steps=2", "trainer.accelerator=cpu", "progress=false", "data.num_workers=2", "data.batch_size=4",
       "batch_size=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ldm.data.shapes import write_shapes
    from ldm.export import export_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    write_shapes(root / "data", num_train=4, num_val=12, resolution=16, seed=1, shard_size=4)
    module = tiny_module()
    hparams = {**dict(module.hparams), "metrics": METRICS}
    ckpt = root / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": pl.__version__}, ckpt)
    export_checkpoint(ckpt, root / "export")
    return root, ckpt


def evaluate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m ldm.evaluate` as a user types it (this checkout's package first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ldm.evaluate", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ldm.evaluate failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def one_and_two_ranks(setup):
    """The same checkpoint, seeds and reference on 1 and 2 ranks (2 loader workers each), side by side."""
    root, ckpt = setup
    common = [f"ckpt={ckpt}", "ref_shards=data/val", "ref_samples=10", "num_samples=9", *RUN]
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(evaluate, root, *common, f"trainer.devices={n}", f"out=out{n}", f"ref_cache=cache{n}")
                for n in (1, 2)]
        [job.result() for job in jobs]
    return {n: read(root / f"out{n}" / "metrics.json") for n in (1, 2)}


def test_one_and_two_ranks_write_the_same_metrics(one_and_two_ranks, setup):
    one, two = one_and_two_ranks[1], one_and_two_ranks[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["settings"] == two["settings"] and one["settings"]["seed"] == 100_000  # validation's metric seeds
    assert one["fid"] == two["fid"] == {"extractor": "small", "num_features": 16}  # the checkpoint's own
    assert one["reference"]["num_images"] == two["reference"]["num_images"] == 10
    assert set(one["metrics"]) == {"fid", "clip_score", "prompt_accuracy"}
    for key in ("fid", "clip_score"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6)
    assert two["metrics"]["prompt_accuracy"] == one["metrics"]["prompt_accuracy"]
    # the reference statistics, summed over 2 ranks x 2 workers, are those one rank computes (to float32 noise)
    from ldm.metrics.reference import load_stats

    root = setup[0]
    a, b = (load_stats(Path(root / d["reference"]["stats"]))[0] for d in (one, two))
    assert int(a["real_features_num_samples"]) == 10
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)  # float32 features, other batches


def test_second_run_hits_the_cache_and_a_sweep_prints_its_table(one_and_two_ranks, setup):
    """-m over a checkpoint and its export, on 2 ranks: each job starts its own ranks (the second does not talk to
    the first one's), both read the saved statistics and score what the 1-rank run scored."""
    root, ckpt = setup
    stats = root / one_and_two_ranks[1]["reference"]["stats"]
    mtime = stats.stat().st_mtime_ns
    proc = evaluate(root, "-m", f"ckpt={ckpt},export", "ref_shards=data/val", "ref_samples=10", "num_samples=9",
                    *RUN, "trainer.devices=2", "ref_cache=cache1", "hydra.sweep.dir=sweep")
    jobs = [read(root / "sweep" / str(i) / "metrics.json") for i in (0, 1)]
    for job in jobs:
        assert job["world_size"] == 2 and job["reference"]["status"] == "hit" and job["reference"]["stats"] == str(stats.relative_to(root))
        assert job["metrics"]["fid"] == pytest.approx(one_and_two_ranks[1]["metrics"]["fid"], rel=1e-5)
    assert stats.stat().st_mtime_ns == mtime  # read, not rewritten
    table = (root / "sweep" / "table.txt").read_text().splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["0", f"ckpt={ckpt}"], ["1", "ckpt=export"]]
    assert f"{jobs[1]['metrics']['fid']:.4f}" in table[2] and "sweep" in proc.stdout


def test_fid_equals_what_training_validation_logs(setup, tmp_path):
    """At equal samples (the first 8 validation images and captions, validation's seeds) evaluate reports the FID
    and CLIP score that LatentDiffusionModule's validation logs for the same checkpoint."""
    from ldm.data.datamodule import ShardDataModule
    from ldm.diffusion.module import LatentDiffusionModule
    from ldm.evaluate import run_evaluation

    root, ckpt = setup
    torch.set_num_threads(1)
    module = LatentDiffusionModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    assert module.num_metric_samples == 8
    data = ShardDataModule(train_shards=None, val_shards=str(root / "data" / "val"), resolution=16,
                           val_batch_size=4, num_workers=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    logged = {k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("fid", "clip_score")}

    def run(*overrides: str) -> dict:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose(config_name="evaluate", overrides=[
                f"ckpt={ckpt}", f"ref_shards={root}/data/val", "ref_samples=8", "num_samples=8", "ref_cache=null",
                f"out={tmp_path}/out", "trainer.accelerator=cpu", "progress=false", "data.num_workers=1", *overrides])
        return run_evaluation(cfg)["metrics"]

    got = run()  # the model's own steps, sampler and guidance, as validation uses
    assert got["fid"] == pytest.approx(logged["fid"], rel=1e-4)
    assert got["clip_score"] == pytest.approx(logged["clip_score"], rel=1e-4)
    other = run("seed=7")  # other seeds: other images, another FID (the match above is not a given)
    print(f"validation logged {logged}; evaluate {got}; evaluate with seed=7 {other}")
    assert abs(other["fid"] - logged["fid"]) > 100 * abs(got["fid"] - logged["fid"])


@pytest.mark.parametrize("overrides, message", [
    (["num_samples=0"], "num_samples=0 must be >= 1"),
    (["ref_stats=x.safetensors"], "not both"),
    (["ref_shards=null"], "no prompts"),
    (["ref_shards=null", "prompts_file=PROMPTS"], "metrics.fid needs reference images"),
    (["metrics.fid.extractor=vgg"], "metrics.fid.extractor='vgg'"),
    (["ref_shards=nowhere"], "ref_shards=nowhere"),
    (["sampler=euler2"], "sampler='euler2'"),
])
def test_errors_name_the_key_before_the_model_loads(setup, tmp_path, monkeypatch, overrides, message):
    import ldm.checkpoints.bundle as bundle
    from ldm.evaluate import run_evaluation
    from ldm.train.checks import ConfigError

    root, ckpt = setup
    monkeypatch.setattr(bundle, "load_ldm", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "p.txt").write_text("a red circle on a blue background\n")
    overrides = [o.replace("PROMPTS", str(tmp_path / "p.txt")) for o in overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="evaluate", overrides=[f"ckpt={ckpt}", f"ref_shards={root}/data/val",
                                                         f"out={tmp_path}/out", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run_evaluation(cfg)


def test_reference_key_follows_the_data_and_the_extractor(setup):
    from ldm.metrics.reference import describe, reference_key

    root, _ = setup
    urls = sorted(str(p) for p in (root / "data" / "val").glob("*.tar"))
    small = {"extractor": "small", "num_features": 16}
    key = reference_key(describe(urls, 16, None, small))
    assert reference_key(describe(urls, 16, None, dict(small))) == key
    assert reference_key(describe(urls, 16, None, {"extractor": "small", "num_features": 32})) != key
    assert reference_key(describe(urls, 16, 8, small)) != key
    assert reference_key(describe(urls[:2], 16, None, small)) != key
    stat = os.stat(urls[0])
    os.utime(urls[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the shard changed: a cache miss
    try:
        assert reference_key(describe(urls, 16, None, small)) != key
    finally:
        os.utime(urls[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))


FAKE_SRUN = """#!/bin/bash
# srun as it starts a 2-task step on one node: every task the same command, its rank in SLURM_* variables.
while [[ "$1" == --* ]]; do shift; done
pids=()
for rank in 0 1; do
    SLURM_PROCID=$rank SLURM_LOCALID=$rank SLURM_NODEID=0 SLURM_STEP_ID=0 "$@" > "task$rank.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_evaluate_sbatch_runs_the_ranks_srun_starts(one_and_two_ranks, setup, tmp_path):
    """slurm/evaluate.sbatch's body under a stand-in srun (2 tasks, Lightning's SLURM environment reads the ranks):
    the same metrics as the 1-rank run, in paths.evaluations/slurm-<job id>/. (train.sbatch runs on a real one-node
    SLURM in tests/test_slurm.py; this script has no real-SLURM test.)"""
    import random

    root, ckpt = setup
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    job = str(random.randint(1000, 9999))  # Lightning's SLURM port is 10000 + the job id's last 4 digits
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "LDM_PYTHON": sys.executable,
                "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "ldm-eval",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1"})
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "evaluate.sbatch"), f"ckpt={ckpt}",
                           f"ref_shards={root}/data/val", "ref_samples=10", "num_samples=9", *RUN,
                           "trainer.accelerator=cpu", f"ref_cache={root}/cache1", "paths.evaluations=evals"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join((tmp_path / f"task{r}.log").read_text()[-2000:] for r in (0, 1) if (tmp_path / f"task{r}.log").exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    got = read(tmp_path / "evals" / f"slurm-{job}" / "metrics.json")
    assert got["world_size"] == 2 and got["reference"]["status"] == "hit"
    assert got["metrics"]["fid"] == pytest.approx(one_and_two_ranks[1]["metrics"]["fid"], rel=1e-5)
    assert got["metrics"]["clip_score"] == pytest.approx(one_and_two_ranks[1]["metrics"]["clip_score"], rel=1e-5)


def test_ref_shards_brace_pattern_reaches_hydra_quoted():
    from ldm.train.entry import quote_shard_patterns

    assert quote_shard_patterns(["ref_shards=/data/coco/{00000..00009}.tar", "num_samples=8"]) == [
        "ref_shards='/data/coco/{00000..00009}.tar'", "num_samples=8"]


def test_saved_statistics_alone_and_kept_images(one_and_two_ranks, setup, tmp_path):
    """ref_stats=FILE needs no shards (prompts from a file); keep_images writes every sample with its manifest.
    A file made with other FID settings is refused, naming ref_stats."""
    from ldm.evaluate import run_evaluation
    from ldm.train.checks import ConfigError

    root, ckpt = setup
    stats = root / one_and_two_ranks[1]["reference"]["stats"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")

    def cfg(*overrides: str):
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return compose(config_name="evaluate", overrides=[
                f"ckpt={ckpt}", f"ref_stats={stats}", f"prompts_file={prompts}", "num_samples=3", "steps=2",
                f"out={tmp_path}/out", "trainer.accelerator=cpu", "progress=false", *overrides])

    result = run_evaluation(cfg("keep_images=true"))
    assert result["reference"]["status"] == "file" and result["reference"]["num_images"] == 10
    assert result["metrics"]["fid"] > 0 and "prompt_accuracy" in result["metrics"]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(m["prompt"][:7], m["seed"]) for m in manifest] == [("a red c", 100_000), ("a green", 100_001),
                                                                 ("a red c", 100_002)]  # prompts cycled
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    with pytest.raises(ConfigError, match="ref_stats=.*num_features"):
        run_evaluation(cfg("metrics.fid.num_features=32"))
