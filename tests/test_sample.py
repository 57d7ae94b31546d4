"""sample.py and the export command on a tiny random model: determinism, errors, bundle = checkpoint, round trips."""

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.train.checks import ConfigError

from .conftest import ROOT, randomize, run_script

PROMPT = "a red circle on a blue background"


def tiny_module():
    from ldm.diffusion.module import LatentDiffusionModule

    torch.manual_seed(0)
    module = LatentDiffusionModule(
        unet=dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                  num_head_channels=16, transformer_depth=1),
        text_encoder=dict(model_name=None, width=32, heads=2, layers=1, context_length=16),
        autoencoder=dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, resolution=16,
                         attn_resolutions=[], norm_num_groups=16),
        scale_factor=0.5, sampler="ddim", num_inference_steps=3, guidance_scale=2.0)
    randomize(module.unet, seed=1, std=0.05)  # zero-initialised output layers would make every image alike
    randomize(module.autoencoder, seed=2, std=0.05)
    module.ema.model.load_state_dict(module.unet.state_dict())
    return module.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    """A Lightning checkpoint written as Lightning writes one: state_dict + hyper_parameters."""
    import pytorch_lightning as pl

    module = tiny_module()
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from ldm.export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "bundle"
    export_checkpoint(ckpt, out)
    return out


def sample_cfg(tmp_path, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="sample", overrides=[f"out={tmp_path}", "progress=false", "steps=2",
                                                        "device=cpu", f"paths.runs={tmp_path}/runs", *overrides])



def run(tmp_path, *overrides):
    from ldm.sampling import run_sampling

    return run_sampling(sample_cfg(tmp_path, *overrides))


def test_same_seed_same_bytes_other_seed_other_image(ckpt, tmp_path):
    a = run(tmp_path / "a", f"ckpt={ckpt}", f"prompt={PROMPT}", "num_images=2", "seed=5")
    run(tmp_path / "b", f"ckpt={ckpt}", f"prompt={PROMPT}", "num_images=2", "seed=5", "batch_size=1")
    c = run(tmp_path / "c", f"ckpt={ckpt}", f"prompt={PROMPT}", "seeds=[6]")
    for name in ("00000.png", "00001.png"):  # batching does not change an image
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.png").read_bytes() != (tmp_path / "a" / "00001.png").read_bytes()
    assert (tmp_path / "a" / "00001.png").read_bytes() == (tmp_path / "c" / "00000.png").read_bytes()  # seed 6
    assert [r["seed"] for r in a["records"]] == [5, 6] and c["records"][0]["seed"] == 6


def test_manifest_grid_and_options(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n  a green square on a white background  \n")
    result = run(tmp_path / "out", f"ckpt={ckpt}", f"prompts_file={prompts}", "num_images=2", "height=24",
                 "width=32", "negative_prompt=blurry", "guidance_scale=4.5", "sampler=dpmpp_2m", "precision=bf16",
                 "guidance_interval=[0.2,0.8]")
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert lines == result["records"] and len(lines) == 4
    assert lines[2] == {"file": "00002.png", "prompt": "a green square on a white background",
                        "negative_prompt": "blurry", "seed": 2, "steps": 2, "guidance_scale": 4.5,
                        "guidance_interval": [0.2, 0.8], "sampler": "dpmpp_2m", "height": 24, "width": 32}
    from PIL import Image

    assert Image.open(out / "00003.png").size == (32, 24)
    assert (out / "grid.png").is_file()
    scores = json.loads((out / "prompt_accuracy.json").read_text())  # shapes prompts: scored, with a confusion
    assert scores["confusion"] == result["prompt_confusion"] and scores["all"] == result["prompt_accuracy"]["all"]
    assert {want: sum(got.values()) for want, got in scores["confusion"]["shape"].items()} == {"circle": 2, "square": 2}


def test_latest_is_the_newest_checkpoint(ckpt, tmp_path):
    import os
    import shutil

    runs = tmp_path / "runs" / "ldm"
    for i, name in enumerate(("2026-01-01_00-00-00", "2026-01-02_00-00-00")):
        target = runs / name / "checkpoints" / "last.ckpt"
        target.parent.mkdir(parents=True)
        shutil.copy(ckpt, target)
        os.utime(target, (1000 + i, 1000 + i))
    result = run(tmp_path / "out", f"prompt={PROMPT}", f"paths.runs={tmp_path}/runs")
    assert result["checkpoint"].endswith("2026-01-02_00-00-00/checkpoints/last.ckpt")


@pytest.mark.parametrize("overrides, message", [
    (["height=18"], "height=18"),                        # latent factor 4: 2 (autoencoder) x 2 (UNet)
    (["width=30", "height=0"], "height=0, width=30"),
    (["sampler=plms"], "sampler='plms'"),
    (["sampler=euler"], "prediction_type"),               # a flow sampler on an epsilon model
    (["ckpt=nowhere/last.ckpt"], "ckpt=nowhere/last.ckpt: no such file"),
    (["prompts_file=PROMPTS"], "holds no prompts"),
    (["prompts_file=missing.txt"], "missing.txt: no such file"),
    ([f"prompt={PROMPT}", "prompts_file=PROMPTS"], "not both"),
    (["precision=fp8"], "precision='fp8'"),
    (["seeds=3"], "seeds=3"),
    (["guidance_interval=[0.9,0.1]"], "guidance_interval must be [lo, hi]"),
    (["ckpt=latest"], "no stage=ldm checkpoint"),
])
def test_errors_name_the_key_before_loading(ckpt, tmp_path, monkeypatch, overrides, message):
    import ldm.checkpoints.bundle as bundle

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(bundle, "load_ldm", never)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    overrides = [o.replace("PROMPTS", str(empty)) for o in overrides]
    if not any(o.startswith("ckpt=") for o in overrides):
        overrides.append(f"ckpt={ckpt}")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(tmp_path / "out", *overrides)


def test_cli_exits_with_the_error(ckpt, tmp_path):
    proc = run_script("sample.py", f"ckpt={ckpt}", "height=17", "device=cpu", f"out={tmp_path}/o", cwd=tmp_path,
                      check=False)
    assert proc.returncode == 2 and "height=17" in proc.stderr and "multiples of 4" in proc.stderr


def test_bundle_samples_what_the_checkpoint_samples(ckpt, bundle, tmp_path):
    run(tmp_path / "ckpt", f"ckpt={ckpt}", f"prompt={PROMPT}", "num_images=2")
    run(tmp_path / "bundle", f"ckpt={bundle}", f"prompt={PROMPT}", "num_images=2")
    for name in ("00000.png", "00001.png", "grid.png"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (tmp_path / "bundle" / name).read_bytes()


def test_export_round_trip(ckpt, bundle):
    from ldm.autoencoder.model import AutoencoderKL
    from ldm.checkpoints.bundle import load_ldm
    from ldm.diffusion.unet import UNetModel

    module = load_ldm(ckpt)
    unet, ae = module.ema.model, module.autoencoder
    for folder in ("diffusers/unet", "diffusers/vae"):
        assert (bundle / folder / "config.json").is_file()
        assert (bundle / folder / "diffusion_pytorch_model.safetensors").is_file()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 16, 32, generator=g)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        want_eps, want_mean = unet(x, t, ctx), ae.encode(image).mean
        for source in (bundle / "diffusers" / "unet", bundle / "compvis" / "unet.safetensors"):
            loaded = UNetModel.from_pretrained(source, **({} if source.is_dir() else dict(unet.config))).eval()
            assert torch.equal(loaded(x, t, ctx), want_eps), source
        assert torch.equal(UNetModel.from_pretrained(bundle, use_ema=True).eval()(x, t, ctx), want_eps)
        for source in (bundle / "diffusers" / "vae", bundle / "compvis" / "vae.safetensors", bundle / "autoencoder"):
            arch = {} if source.is_dir() else dict(resolution=16, norm_num_groups=16)
            loaded = AutoencoderKL.from_pretrained(source, **arch).eval()
            assert torch.equal(loaded.encode(image).mean, want_mean), source
            assert torch.equal(loaded.decode(x), ae.decode(x)), source
    assert json.loads((bundle / "diffusers" / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


def test_export_cli_errors(tmp_path):
    from ldm.export import main

    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert main(["--ckpt", "latest", "--runs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_weights_cache_points_the_text_encoder_at_the_prefetched_file(tmp_path, monkeypatch):
    from ldm.sampling import offline_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    hparams = {"text_encoder": {"kind": "openclip", "model_name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}}
    assert offline_text_encoder(hparams, None) is None
    assert offline_text_encoder({"text_encoder": {"model_name": None}}, str(tmp_path)) is None  # travels in the ckpt
    folder = tmp_path / "open_clip" / "ViT-H-14" / "laion2b_s32b_b79k"
    with pytest.raises(ConfigError, match=re.escape(str(folder))):
        offline_text_encoder(hparams, str(tmp_path))
    folder.mkdir(parents=True)
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    overrides = offline_text_encoder(hparams, str(tmp_path))
    assert overrides["text_encoder"]["cache_dir"] == str(tmp_path / "open_clip")
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_class_conditional_model_names_the_prompt_that_is_not_a_class():
    """A text prompt to a class-conditional model stops with the valid labels, not a traceback mid-sampling."""
    from ldm.conditioning.class_embedding import ClassEmbedder
    from ldm.sampling import check_prompts_fit

    named = ClassEmbedder(3, 8, class_names=["circle", "square", "triangle"])
    check_prompts_fit(named, ["circle", "2", ""])  # names, integer labels and "" (unconditional) all fit
    with pytest.raises(ConfigError, match=r"class-conditional.*'circle'.*'a red circle'"):
        check_prompts_fit(named, ["square", "a red circle"])
    with pytest.raises(ConfigError, match=r"integer in \[0, 3\).*'7'"):
        check_prompts_fit(ClassEmbedder(3, 8), ["7"])
    check_prompts_fit(torch.nn.Identity(), ["anything goes for a text encoder"])
