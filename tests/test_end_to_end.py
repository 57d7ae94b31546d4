"""The whole pipeline at toy size, through the real entry points: vae -> ldm -> sample.py."""

import json
import math

import pytest

from .conftest import run_script, run_scripts_together

TINY = [
    "logger=csv", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "data.resolution=16",
    "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=0", "model.autoencoder.ch=16",
    "model.unet.model_channels=32", "model.unet.num_head_channels=16", "model.text_encoder.width=32",
    "checkpoint.every_n_train_steps=2",
]
# TINY with the loader as users run it: worker processes (forked, persistent). Fault, resume and distributed
# tests use this: workers inherit signal handlers and state, which num_workers=0 would hide.
USER_DATA = [a for a in TINY if not a.startswith("data.num_workers=")] + ["data.num_workers=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_shapes):
    work = tmp_path_factory.mktemp("work")
    data = [f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val"]
    return work, TINY + data + ["paths.runs=runs", "paths.exports=exports"]


@pytest.fixture(scope="module")
def no_autoencoder_start(workdir):
    """stage=ldm without an autoencoder, started in a thread (its own runs dir): it runs while the single-process
    vae run below leaves the other CI core idle."""
    from concurrent.futures import ThreadPoolExecutor

    work, common = workdir
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_script, "train.py", "stage=ldm", *common, "paths.exports=nowhere",
                          "paths.runs=runs-nowhere", cwd=work, check=False)


@pytest.mark.usefixtures("no_autoencoder_start")  # only to start it alongside; tested below
def test_vae_then_ldm_then_sample(workdir):
    work, common = workdir
    run_script("train.py", "stage=vae", *common, "trainer.max_steps=3", "trainer.val_check_interval=3",
               "stage.module.loss.perceptual_weight=1.0", cwd=work)
    export = work / "exports" / "autoencoder"
    assert (export / "autoencoder.safetensors").exists()
    assert json.loads((export / "autoencoder.json").read_text())["resolution"] == 16
    vae_runs = list((work / "runs" / "vae").iterdir())
    assert len(vae_runs) == 1 and (vae_runs[0] / "checkpoints" / "last.ckpt").exists()
    summary = json.loads((vae_runs[0] / "summary.json").read_text())
    assert summary["global_step"] == 3 and "val/psnr" in summary["metrics"]
    run_export = vae_runs[0] / "export"  # the same weights for outside tools
    assert (run_export / "diffusers" / "config.json").exists() and (run_export / "vae.safetensors").exists()

    # Compiled (aot_eager: the capture without code generation): checkpoints, exports and sampling below must not
    # notice, as nn.Module.compile keeps the state-dict keys.
    proc = run_script("train.py", "stage=ldm", *common, "trainer.max_steps=4", "trainer.val_check_interval=4",
                      "stage.num_val_prompts=4", "stage.module.num_inference_steps=3",
                      "stage.module.metrics.num_samples=6", "trainer.limit_val_batches=2", "perf.compile=true",
                      "perf.compile_backend=aot_eager",
                      cwd=work)
    assert "[ldm] perf: compile unet (aot_eager, default)" in proc.stdout
    finished = list((work / "runs" / "ldm").glob("*/summary.json"))
    assert len(finished) == 1
    ldm_run = finished[0].parent
    summary = json.loads(finished[0].read_text())
    assert summary["global_step"] == 4
    assert "val/prompt_accuracy/all" in summary["metrics"]
    fid, clip = summary["metrics"]["val/fid"], summary["metrics"]["val/clip_score"]  # offline extractors
    assert math.isfinite(fid) and fid > 0, fid
    assert 0 < clip <= 100, clip  # 100 x a cosine, floored at 0
    meta = json.loads((ldm_run / "export" / "unet.json").read_text())
    assert meta["scale_factor"] > 0
    assert (ldm_run / "export" / "diffusers" / "unet" / "config.json").exists()
    assert (ldm_run / "export" / "compvis" / "unet.safetensors").exists()

    out = work / "samples"
    # Settings unlike the model's own (guidance 3.0 over [0.3, 1.0], euler_ancestral), so the manifest must record
    # what was asked and used, not the model's.
    asked = ["prompt=a red circle on a blue background", "num_images=2", "steps=3", "seed=7", "guidance_scale=2.5",
             "guidance_interval=[0.2,0.9]", "sampler=euler", "paths.runs=runs"]
    out2 = work / "samples2"  # the same again in another process, side by side: same seed, same image
    run_scripts_together(("sample.py", [*asked, f"out={out}"], work, True),
                         ("sample.py", [*asked, f"out={out2}"], work, True))
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in lines] == [7, 8]
    assert lines[0] == {"file": "00000.png", "prompt": "a red circle on a blue background", "negative_prompt": "",
                        "seed": 7, "steps": 3, "guidance_scale": 2.5, "guidance_interval": [0.2, 0.9],
                        "sampler": "euler", "height": 16, "width": 16}
    assert (out / "00001.png").exists() and (out / "grid.png").exists()
    scores = json.loads((out / "prompt_accuracy.json").read_text())
    assert set(scores) == {"color", "background", "shape", "all", "confusion"}
    assert sum(scores["confusion"]["shape"]["circle"].values()) == 2  # both samples, read as whatever they show

    # Same seed, same image.
    assert (out / "00000.png").read_bytes() == (out2 / "00000.png").read_bytes()


def test_ldm_without_autoencoder_stops_at_start(workdir, no_autoencoder_start):
    work, _ = workdir
    proc = no_autoencoder_start.result()
    assert proc.returncode == 2
    assert "needs a trained autoencoder" in proc.stderr and "python train.py stage=vae" in proc.stderr
    runs = work / "runs-nowhere" / "ldm"
    assert not runs.exists() or not list(runs.glob("*/checkpoints/*"))
