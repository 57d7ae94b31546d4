"""No file the project reads runs code, and every refused file or bad start-up value ends in one `error:` line.

Each entry point gets a `.ckpt` whose pickle would create a marker file when unpickled (plain `torch.load` with
`weights_only=False` runs it: the guard test below shows that). The entry point must exit 2 with one `error:`
line naming the file, and the marker must not exist afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT

TINY = ["logger=csv", "trainer.accelerator=cpu", "data.resolution=16", "data.batch_size=4", "data.val_batch_size=4",
        "data.num_workers=2", "model.autoencoder.ch=16", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "checkpoint.every_n_train_steps=2", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2"]


class _TouchesMarker:
    """Unpickling this creates `marker`: what a shared checkpoint could do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_ckpt(path: Path, marker: Path) -> Path:
    """Looks like a Lightning checkpoint of ours (global_step, state_dict), with code in its hyper_parameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 10_000, "epoch": 0, "state_dict": {}, "hyper_parameters": _TouchesMarker(marker),
                "pytorch-lightning_version": "2.6.6"}, path)
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _train_in_process(monkeypatch, capfd, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """train.py's body (its config, ldm.train.entry's error handling) without a new interpreter's start-up."""
    from hydra import compose, initialize_config_dir

    from ldm.train.cli import train
    from ldm.train.entry import quote_shard_patterns, run_reporting_errors

    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=quote_shard_patterns(list(overrides)))
    capfd.readouterr()
    try:
        run_reporting_errors(lambda: train(cfg))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["train.py", *overrides], code, out, err)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_the_payload_runs_under_a_plain_unpickle(tmp_path: Path) -> None:
    """Guard: the test file really is dangerous, so the tests below show protection, not a harmless file."""
    marker = tmp_path / "ran"
    ckpt = _malicious_ckpt(tmp_path / "evil.ckpt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shapes) -> tuple[Path, list[str]]:
    """A real stage=vae run (2 steps, loader workers on) in a fixed run dir, and its autoencoder export."""
    work = tmp_path_factory.mktemp("work")
    common = [*TINY, f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
              "paths.runs=runs", "paths.exports=exports"]
    proc = _run(str(ROOT / "train.py"), "stage=vae", *common, "trainer.max_steps=2", "hydra.run.dir=runs/vae/first",
                cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (work / "runs" / "vae" / "first" / "checkpoints" / "last.ckpt").is_file()
    return work, common


def test_sample_py_refuses_a_code_carrying_ckpt(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ckpt = _malicious_ckpt(tmp_path / "shared.ckpt", marker)
    proc = _run(str(ROOT / "sample.py"), f"ckpt={ckpt}", "prompt=x", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_one_error_line(proc, "shared.ckpt", "refused to unpickle")


def test_export_refuses_a_code_carrying_ckpt(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ckpt = _malicious_ckpt(tmp_path / "shared.ckpt", marker)
    proc = _run("-m", "ldm.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), cwd=ROOT)
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_one_error_line(proc, "shared.ckpt", "refused to unpickle")
    assert not (tmp_path / "out").exists()


def test_train_ckpt_path_refuses_a_code_carrying_ckpt(trained, tmp_path: Path) -> None:
    work, common = trained
    marker = tmp_path / "ran"
    ckpt = _malicious_ckpt(tmp_path / "shared.ckpt", marker)
    proc = _run(str(ROOT / "train.py"), "stage=vae", *common, f"ckpt={ckpt}", "trainer.max_steps=3",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=work)
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_one_error_line(proc, f"ckpt={ckpt}", "refused to unpickle")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_ckpt_last_skips_a_code_carrying_ckpt(trained, tmp_path: Path, monkeypatch, capfd) -> None:
    """The newest run of the stage holds only the malicious file: it is skipped with a warning, never loaded,
    and with nothing else to resume ckpt=last stops with its one line."""
    work, common = trained
    marker = tmp_path / "ran"
    evil = _malicious_ckpt(tmp_path / "runs" / "vae" / "newest" / "checkpoints" / "last.ckpt", marker)
    proc = _train_in_process(monkeypatch, capfd, tmp_path, "stage=vae", *common, "ckpt=last",
                             f"paths.runs={tmp_path / 'runs'}")
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_one_error_line(proc, "ckpt=last", "no checkpoint")
    assert f"skipping {evil}" in proc.stdout


def test_train_ckpt_auto_resumes_past_a_code_carrying_ckpt(trained, tmp_path: Path) -> None:
    """A requeue-style file claiming a far step sits beside the run's own checkpoints: ckpt=auto skips it with
    a warning and resumes from the real step-2 checkpoint."""
    work, common = trained
    run = work / "runs" / "vae" / "first"
    marker = tmp_path / "ran"
    evil = _malicious_ckpt(run / "hpc_ckpt_9.ckpt", marker)
    try:
        proc = _run(str(ROOT / "train.py"), "stage=vae", *common, "ckpt=auto", "trainer.max_steps=3",
                    f"hydra.run.dir={run}", cwd=work)
    finally:
        evil.unlink()
    assert not marker.exists(), "the checkpoint's payload ran"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"skipping {evil}" in proc.stdout
    assert f"resuming from {run / 'checkpoints'}" in proc.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.train_shards=/nonexistent/{00000..00003}.tar", "data.train_shards"),
    ("stage.module.sampler=plms", "stage.module.sampler"),
    ("data.resolution=36", "data.resolution=36"),
])
def test_a_bad_start_up_value_is_one_error_line(trained, tmp_path: Path, monkeypatch, capfd, override: str,
                                                key: str) -> None:
    work, common = trained
    stage = "stage=ldm" if "sampler" in override else "stage=vae"
    extra = ["model/autoencoder=kl_f8"] if "resolution" in override else []
    monkeypatch.chdir(work)
    proc = _train_in_process(monkeypatch, capfd, tmp_path, stage, *common, *extra, override)
    _assert_one_error_line(proc, key)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fid_weights_file_is_read_as_data_before_torch_fidelity_unpickles_it(tmp_path: Path) -> None:
    """torch-fidelity loads `feature_extractor_weights_path` with weights_only=False; ours refuses code first."""
    from ldm.checkpoints.files import RefusedFileError
    from ldm.metrics.fid import build_fid

    marker = tmp_path / "ran"
    evil = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _TouchesMarker(marker)}, evil)
    with pytest.raises(RefusedFileError, match="inception.pth.*refused to unpickle"):
        build_fid("inception", 64, feature_extractor_weights_path=str(evil))
    assert not marker.exists()


def test_every_torch_load_in_the_product_is_weights_only() -> None:
    """A static guard for the next loader someone writes: each `torch.load(...)` in ldm/, bench/ and the entry
    points passes `weights_only=True` literally (torch's default can be flipped by an environment variable)."""
    import ast

    offenders = []
    files = [*ROOT.glob("ldm/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(files) > 50 and not offenders, offenders


def test_stage_vae_under_fsdp_is_one_error_line(tmp_path: Path, monkeypatch, capfd) -> None:
    """trainer=fsdp shards stage 2's UNet only: stage=vae under it stops at start-up, not at FSDP's setup."""
    proc = _train_in_process(monkeypatch, capfd, tmp_path, "stage=vae", "trainer=fsdp", "trainer.accelerator=cpu",
                             "trainer.devices=2", "model.autoencoder.ch=16", "data.resolution=16")
    _assert_one_error_line(proc, "trainer=fsdp", "trainer=ddp")
