"""Against a real SLURM (slurm-wlm + munge, one node on localhost, started by slurm/local_cluster.sh):
the sbatch script trains both stages with 2 tasks (CPU, gloo), SIGUSR1 saves + requeues + resumes, and a
Hydra -m sweep through hydra/launcher=slurm runs its jobs (one of them preempted and resumed the same way).

Needs root (slurmd) and either installed slurm-wlm/munge or apt-get; skipped otherwise, unless
LDM_REQUIRE_SLURM=1 (set by .ci/run): then a machine that cannot run them fails the tests instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ROOT
from .test_end_to_end import USER_DATA
from .test_requeue import steps_by_write_time

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
QUICK = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"]


def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def no_cluster(reason: str) -> None:
    """Skip, or fail where the tests are required (CI): a skipped SLURM test would let a broken script pass."""
    if os.environ.get("LDM_REQUIRE_SLURM") == "1":
        pytest.fail(f"LDM_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment for sbatch/scontrol/train.py that talks to a fresh one-node cluster; stopped afterwards."""
    if os.geteuid() != 0:
        no_cluster("local SLURM needs root (slurmd starts job steps as their owner)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        no_cluster("slurm-wlm is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LDM_SLURM_DIR": str(state), "LDM_SLURM_PORT": str(_free_port_pair()),
           "SLURM_CONF": str(state / "slurm.conf"), "PATH": f"{state}/bin:{Path(sys.executable).parent}:"
           f"{os.environ['PATH']}", "LDM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]  # a test run inside a SLURM job must not hand its own job to ours
    start = time.time()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        no_cluster(f"no local SLURM: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    print(f"local SLURM up in {time.time() - start:.1f} s")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60)


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(what: str, predicate, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sbatch(env: dict, out: Path, *args: str) -> str:
    """Submit train.sbatch with 2 tasks; returns the job id at once (see wait_for_end)."""
    cmd = ["sbatch", "--parsable", f"--output={out}/slurm-%j.out", "--ntasks-per-node=2", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=10", "slurm/train.sbatch", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job, proc.stderr
    return job


def wait_for_end(env: dict, job: str, timeout: float = 300) -> dict[str, str]:
    """The job's record once it has ended. Polled every 0.2 s: `sbatch --wait` polls slurmctld at growing
    intervals (10 s for a 1 s job, 42 s for a 12 s one on slurm-wlm 22.05), which idled minutes of CI."""
    wait_for(f"job {job} to end", lambda: job_info(env, job).get("JobState") in ENDED, timeout, 0.2)
    return job_info(env, job)


def common(tiny_shapes, tmp_path) -> list[str]:
    return [*USER_DATA, *QUICK, f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
            f"paths.runs={tmp_path}/runs", f"paths.exports={tmp_path}/exports"]


def log_of(out: Path, job: str, tail: int = 6000) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text()[-tail:] if path.exists() else "(no log)"


def check_requeue_saves(written: list[tuple[int, str]]) -> int:
    """`written` (steps_by_write_time) while the job waits requeued (nothing runs): one hpc checkpoint, saved by
    the trainer, and no file that goes back in steps (a loader worker's stale copy of the trainer would save
    global step 0). Returns the furthest saved step, where the requeued job must start."""
    hpc = [s for s, name in written if name.startswith("hpc_ckpt_")]
    assert len(hpc) == 1 and hpc[0] >= 4, written
    steps = [s for s, _ in written]
    assert steps == sorted(steps), f"a checkpoint went back in steps: {written}"
    return max(steps)


def _affinities(out: Path) -> dict[str, list[int]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


# The node has 2 CPUs (LDM_SLURM_CPUS) and 2 tasks x 2 CPUs need 4: --overcommit allocates cpus-per-task per node
# rather than per task, so the job fits, and srun without --cpus-per-task still gives each task one CPU of it.
# SLURM refuses --overcommit together with --ntasks-per-node (train.sbatch's #SBATCH line) on this node, so the
# job runs train.sbatch's body, slurm/srun_train.sh, with --ntasks.
PER_TASK = ["--ntasks=2", "--cpus-per-task=2", "--overcommit"]


def test_srun_gives_each_rank_the_cpus_per_task_of_the_job(cluster, tmp_path):
    """srun (22.05+) no longer reads --cpus-per-task from sbatch: slurm/srun_train.sh must pass it on."""
    recorder = tmp_path / "python"  # stands in for LDM_PYTHON: records what srun gave the rank, trains nothing
    recorder.write_text(f"#!{sys.executable}\nimport json, os\n"
                        f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['SLURM_PROCID'] + '.json'), 'w')"
                        f".write(json.dumps(sorted(os.sched_getaffinity(0))))\n")
    recorder.chmod(0o755)
    env = {**cluster, "LDM_PYTHON": str(recorder)}
    cmd = ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", *PER_TASK, "--gpus-per-node=0",
           "--time=2", "--wrap=bash slurm/srun_train.sh stage=vae"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    job = proc.stdout.strip().split(";")[0]
    assert job, proc.stderr
    state = wait_for("the job to end", lambda: job_info(cluster, job).get("JobState") in
                     ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and job_info(cluster, job)["JobState"], 60, 0.2)
    assert state == "COMPLETED", log_of(tmp_path, job)
    cpus = _affinities(tmp_path)
    assert sorted(cpus) == ["rank0", "rank1"] and all(len(c) == 2 for c in cpus.values()), cpus


def test_submitit_launcher_gives_each_rank_the_cpus_per_task(cluster, tmp_path):
    """The same for hydra/launcher=slurm: submitit's srun gets --cpus-per-task from the config's setup line."""
    import submitit
    import yaml

    setup = yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())["setup"]
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit", python=sys.executable)
    # --ntasks (see PER_TASK), so submitit counts one task: both tasks' results are read through a two-task job.
    executor.update_parameters(cpus_per_task=2, gpus_per_node=0, time=2, setup=setup,
                               additional_parameters={"ntasks": 2, "overcommit": True})
    old = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update({k: cluster[k] for k in old})  # submitit calls sbatch and sacct from this process
    try:
        job = executor.submit(os.sched_getaffinity, 0)
        cpus = submitit.SlurmJob(job.paths.folder, job.job_id, tasks=(0, 1)).results()
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert len(cpus) == 2 and all(len(c) == 2 for c in cpus), cpus


VAE_STEPS = 24


@pytest.fixture(scope="module")
def preempted_vae(cluster, tiny_shapes, tmp_path_factory) -> SimpleNamespace:
    """One 2-task stage=vae job as train.sbatch runs it, sent USR1 after its first checkpoint (what SLURM sends 90 s
    early), requeued, released and finished. Read by the two tests below: the requeue test, and the two-stage test,
    whose stage=ldm job trains on this job's exported autoencoder (one 2-task vae job instead of two)."""
    out = tmp_path_factory.mktemp("sbatch-vae")
    job = sbatch(cluster, out, "stage=vae", *common(tiny_shapes, out), f"trainer.max_steps={VAE_STEPS}",
                 f"trainer.val_check_interval={VAE_STEPS}", "checkpoint.every_n_train_steps=4")
    run = out / "runs" / "vae" / f"slurm-{job}"  # the run dir is keyed by the job id
    wait_for("the first checkpoint", lambda: (run / "checkpoints" / "step0000004.ckpt").exists(), 240, 0.2)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    wait_for("the requeue", lambda: job_info(cluster, job).get("Restarts") == "1" and
             job_info(cluster, job).get("JobState") == "PENDING", 120)
    requeued = time.time()
    written = steps_by_write_time(run)  # while the job waits requeued
    # SLURM holds a requeued job for about two minutes; release it now.
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=cluster, check=True)
    info = wait_for_end(cluster, job)
    print(f"USR1 -> requeued (pending) {requeued - signalled:.1f} s; released -> finished {time.time() - requeued:.1f}"
          f" s; saved {written}")
    return SimpleNamespace(job=job, out=out, run=run, written=written, info=info)


def test_sbatch_two_tasks_trains_vae_then_ldm(preempted_vae, cluster, tiny_shapes, tmp_path):
    vae = preempted_vae
    assert (vae.info["JobState"], vae.info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(vae.out, vae.job)
    summary = json.loads((vae.run / "summary.json").read_text())
    assert summary["global_step"] == VAE_STEPS
    # two srun tasks, one DDP job; the counts are checkpointed, so they also survived the requeue
    assert summary["optimizer_steps_per_rank"] == [[VAE_STEPS, 0], [VAE_STEPS, 0]]
    assert (vae.run / "train_rank1.log").exists() and (vae.run / "checkpoints" / "last.ckpt").exists()
    assert "srun exited with 0" in log_of(vae.out, vae.job)

    job = sbatch(cluster, tmp_path, "stage=ldm", *common(tiny_shapes, tmp_path), f"paths.exports={vae.out}/exports",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "stage.num_val_prompts=2",
                 "stage.module.num_inference_steps=2", "stage.module.metrics.num_samples=0")
    info = wait_for_end(cluster, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(tmp_path, job)
    summary = json.loads((tmp_path / "runs" / "ldm" / f"slurm-{job}" / "summary.json").read_text())
    assert summary["global_step"] == 2 and "val/loss" in summary["metrics"]


def test_usr1_saves_requeues_and_resumes(preempted_vae):
    vae = preempted_vae
    furthest = check_requeue_saves(vae.written)
    assert vae.info["JobState"] == "COMPLETED", log_of(vae.out, vae.job)
    summary = json.loads((vae.run / "summary.json").read_text())
    assert summary["global_step"] == VAE_STEPS
    assert summary["start_step"] == furthest < VAE_STEPS  # continued from the furthest save, not from 0
    assert "restart 1" in log_of(vae.out, vae.job, tail=10**7)


def test_sweep_through_submitit_launcher(cluster, tiny_shapes, tmp_path):
    """Two sweep points as a SLURM array (1 task each, side by side); point 0 is preempted with USR1 mid-run."""
    steps = 16
    sweep = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "stage=vae",
         *common(tiny_shapes, tmp_path), f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
         "checkpoint.every_n_train_steps=4", "seed=1,2"],
        cwd=tmp_path, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sweep_dir = wait_for("the sweep dir", lambda: next((tmp_path / "runs" / "multirun").glob("*/"), None), 120)
        point = sweep_dir / "0"
        wait_for("point 0's first checkpoint", lambda: (point / "checkpoints" / "step0000004.ckpt").exists(), 240, 0.2)
        array = wait_for("the array job id", lambda: next((p.name for p in (sweep_dir / ".submitit").iterdir()
                                                           if p.name.isdigit()), None), 30)
        job = f"{array}_0"
        subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
        wait_for("the requeue", lambda: job_info(cluster, job).get("JobState") == "PENDING", 120)
        furthest = check_requeue_saves(steps_by_write_time(point))
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=cluster, check=True)
        output, _ = sweep.communicate(timeout=400)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-4000:]
    first = json.loads((point / "summary.json").read_text())
    second = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert first["global_step"] == second["global_step"] == steps
    assert first["start_step"] == furthest < steps  # USR1 -> the trainer saved, requeued, resumed there
    assert second["start_step"] == 0


def test_sbatch_exit_code_is_sruns(cluster, tiny_shapes, tmp_path):
    """A run that stops at start-up (stage=ldm without an autoencoder) fails the job with srun's exit code (the
    job's ExitCode, which is also what `sbatch --wait` returns)."""
    job = sbatch(cluster, tmp_path, "stage=ldm", *common(tiny_shapes, tmp_path), f"paths.exports={tmp_path}/none")
    info = wait_for_end(cluster, job, timeout=120)
    log = log_of(tmp_path, job, tail=10**7)
    srun_rc = int(re.search(r"srun exited with (\d+)", log).group(1))
    # 2 from the first rank out; srun may instead report the rank --kill-on-bad-exit killed. Either way: != 0.
    assert srun_rc != 0, log[-4000:]
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", f"{srun_rc}:0"), log[-4000:]
    assert "needs a trained autoencoder" in log
