"""The entry points' start-up path: brace patterns in shard keys as typed in bash, and one `error:` line with
exit status 2 for settings that cannot work (a wrong autoencoder for latent shards, weights that cannot be
downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ldm.train.entry import explain_download_failure, quote_shard_patterns

from .conftest import ROOT
from .test_end_to_end import TINY


@pytest.mark.parametrize("typed,parsed", [
    # what bash hands over for data.train_shards='/data/laion/{00000..01023}.tar'
    ("data.train_shards=/data/laion/{00000..01023}.tar", "data.train_shards='/data/laion/{00000..01023}.tar'"),
    ("data.val_shards=/data/val/{0..3}.tar", "data.val_shards='/data/val/{0..3}.tar'"),
    ("+data.train_shards=/a/{0..2}.tar", "+data.train_shards='/a/{0..2}.tar'"),
    ("data.train_shards=pipe:aws s3 cp s3://b/{00000..01023}.tar -",
     "data.train_shards='pipe:aws s3 cp s3://b/{00000..01023}.tar -'"),
    ("data.train_shards=/a/{x,y}.tar", "data.train_shards='/a/{x,y}.tar'"),  # a brace list: one value
    # -m sweeps over patterns: each value on its own
    ("data.train_shards=/a/{0..1}.tar,/b/{0..1}.tar", "data.train_shards='/a/{0..1}.tar','/b/{0..1}.tar'"),
    # the mixing list: each bare shards entry, nothing else
    ("data.train_shards=[{shards: /a/{00000..00999}.tar, weight: 3}, {shards: /b, weight: 1}]",
     "data.train_shards=[{shards: '/a/{00000..00999}.tar', weight: 3}, {shards: /b, weight: 1}]"),
])
def test_brace_patterns_in_shard_keys_are_quoted(typed, parsed):
    assert quote_shard_patterns([typed]) == [parsed]


@pytest.mark.parametrize("arg", [
    "data.train_shards='/a/{0..1}.tar'",                                  # already quoted (an sbatch line, a DDP child)
    "data.train_shards=\"/a/{0..1}.tar\"",
    "data.train_shards=data/mine/train",                                  # no braces
    "data.train_shards=[{shards: '/a/{0..9}.tar', weight: 3}]",           # quoted inside the list
    "stage.module.note=/a/{0..1}.tar",                                    # not a shard key
    "data.train_shards_extra=/a/{0..1}.tar",
    "hydra.run.dir=/runs/{x}",
    "stage=vae",
])
def test_everything_else_passes_through(arg):
    assert quote_shard_patterns([arg]) == [arg]


def test_the_quoted_value_is_what_hydra_gives_the_data_module(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=quote_shard_patterns([
            "data=webdataset", "data.train_shards=/data/laion/{00000..01023}.tar",
            "data.val_shards=[{shards: /v/{0..3}.tar, weight: 1}]"]))
    assert cfg.data.train_shards == "/data/laion/{00000..01023}.tar"
    assert list(cfg.data.val_shards) == [{"shards": "/v/{0..3}.tar", "weight": 1}]


def test_download_failure_names_the_file_and_both_ways_out(tmp_path, monkeypatch):
    """The real download: build_fid's Inception, which torch-fidelity fetches, with the internet unreachable."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from ldm.metrics.fid import build_fid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached copy: it must download
    proxy = {"https": "http://127.0.0.1:9", "http": "http://127.0.0.1:9"}  # a closed local port: refused at once
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler(proxy)))
    try:
        with pytest.raises(Exception) as caught:
            build_fid("inception", 64)
    finally:
        urllib.request.install_opener(None)
    assert explain_download_failure(RuntimeError("wrapped")) is None
    message = explain_download_failure(caught.value)
    assert message is not None, repr(caught.value)
    assert URL_INCEPTION_V3.rsplit("/", 1)[1] in message  # the file torch-fidelity asked for, named by its own URL
    assert "python -m ldm.prefetch" in message
    assert "offline=true" in message and "feature_extractor_weights_path" in message


def _offline_env() -> dict[str, str]:
    """No internet, deterministically: every HTTP(S) request goes to a closed local port."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy":
                "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "1",
                "HF_HUB_DOWNLOAD_TIMEOUT": "1", "TORCH_HOME": "/nonexistent-torch-home", "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1"})
    return env


def test_fid_inception_without_internet_is_one_error_line(tmp_path, tiny_shapes):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "stage=vae", *TINY, f"data.train_shards={tiny_shapes}/train",
         f"data.val_shards={tiny_shapes}/val", "paths.runs=runs", "paths.exports=exports", "trainer.max_steps=1",
         "stage.module.metrics.fid.extractor=inception"],
        cwd=tmp_path, env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not download pretrained weights" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "python -m ldm.prefetch" in errors[0]


def test_srun_train_passes_a_brace_pattern_through_unchanged(tmp_path):
    """sbatch slurm/train.sbatch ... data.train_shards='/data/laion/{00000..01023}.tar': bash hands the script
    the unquoted pattern; srun_train.sh must give it to train.py as one argument, unexpanded."""
    fake = tmp_path / "srun"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/argv\n')
    fake.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_JOB_ID": "7",
           "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": str(ROOT), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    typed = "data.train_shards=/data/laion/{00000..01023}.tar"
    subprocess.run(["bash", str(ROOT / "slurm" / "srun_train.sh"), "stage=vae", typed], env=env, check=True,
                   capture_output=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert typed in argv and argv.count(typed) == 1 and "stage=vae" in argv
    assert quote_shard_patterns(argv[argv.index("stage=vae"):]) == [
        "stage=vae", "data.train_shards='/data/laion/{00000..01023}.tar'"]
