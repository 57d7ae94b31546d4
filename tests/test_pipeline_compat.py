"""Start stage=ldm from a diffusers pipeline, export, and draw the same picture in diffusers and in sample.py.

Per style (SD 1 and SD 2, see tests/sd_pipelines.py): train.py stage=ldm model.init_from=PIPELINE for one step
at lr 1e-12, then
- the exported pipeline equals the original (every tensor within 1e-5, no missing or unexpected keys) and
  diffusers draws the same picture from both;
- sample.py on the export draws diffusers' picture from the same prompt, seed, DDIM steps and guidance, also
  with the scheduler loaded alone (DDIMScheduler.from_pretrained(export, subfolder="scheduler"));
- StableDiffusionPipeline.from_single_file(export/sd.safetensors, config=export/diffusers) holds the same weights;
- model.init_from=export (our bundle) and =sd.safetensors read back the same weights and settings.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import ROOT, run_script
from .sd_pipelines import build_pipeline, draw

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT, SEED, STEPS, GUIDANCE = "a red circle on a blue background", 5, 4, 4.0
COMPONENTS = ("unet", "vae", "text_encoder")
# ~recipe: the paper's defaults; the shapes data's built-in recipe trains flow, which SD pipelines are not.
RUN = ["~recipe", "logger=csv", "trainer.accelerator=cpu", "trainer.max_steps=1", "trainer.limit_val_batches=0",
       "data.resolution=16", "data.batch_size=2", "data.num_workers=0", "stage.module.lr=1e-12",
       "stage.module.warmup_steps=0", "stage.module.metrics.num_samples=0", "checkpoint.every_n_train_steps=100"]


def max_state_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), (sorted(set(sa) ^ set(sb)))[:8]
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def trained(request, tmp_path_factory, tiny_shapes):
    """(style, original pipeline, work folder, the run's export folder, diffusers' pipeline loaded from it)."""
    style = request.param
    work = tmp_path_factory.mktemp(f"init_{style}")
    original = build_pipeline(style, work / "original")
    run_script("train.py", "stage=ldm", f"model.init_from={work / 'original'}", *RUN,
               f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val", "paths.runs=runs",
               cwd=work)
    export = next((work / "runs" / "ldm").glob("*/export"))
    back = diffusers.StableDiffusionPipeline.from_pretrained(export / "diffusers")  # offline: a local folder
    return style, original, work, export, back


def test_settings_come_from_the_pipeline(trained):
    style, original, _work, export, _ = trained
    meta = json.loads((export / "unet.json").read_text())
    assert meta["prediction_type"] == original.scheduler.config.prediction_type
    assert meta["scale_factor"] == pytest.approx(0.5)  # the VAE's scaling_factor, not an estimate
    text = meta["module"]["text_encoder"]
    assert text["layer"] == ("penultimate" if style == "sd2" else "last")
    assert (text["act"], text["pad_id"]) == (("gelu", 0) if style == "sd2" else ("quick_gelu", 49407))


def test_round_trip_weights_and_picture(trained, one_thread):
    style, original, _work, _export, back = trained
    for name in COMPONENTS:
        diff = max_state_diff(getattr(original, name), getattr(back, name))
        print(f"{style} round trip {name}: max |exported - original| = {diff:.2e}")
        assert diff < 1e-5
    assert back.scheduler.config.prediction_type == original.scheduler.config.prediction_type
    assert back.tokenizer.pad_token == original.tokenizer.pad_token
    a, b = draw(original, PROMPT, SEED, STEPS, GUIDANCE), draw(back, PROMPT, SEED, STEPS, GUIDANCE)
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    print(f"{style} round trip picture: max pixel difference {diff}/255 (std {a.std():.1f})")
    assert diff <= 2 and a.std() > 5


def test_sample_py_draws_diffusers_picture(trained, one_thread):
    from hydra import compose, initialize_config_dir

    from ldm.sampling import run_sampling

    style, _original, work, export, back = trained
    out = work / "samples"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={export}", f"prompt={PROMPT}", f"seed={SEED}", f"steps={STEPS}",
                                           f"guidance_scale={GUIDANCE}", "sampler=ddim", "device=cpu", f"out={out}",
                                           "progress=false"])
    run_sampling(cfg)  # what sample.py runs
    ours = np.asarray(Image.open(out / "00000.png").convert("RGB"))
    theirs = draw(back, PROMPT, SEED, STEPS, GUIDANCE)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    print(f"{style} sample.py vs diffusers on the export: max pixel difference {diff}/255")
    assert diff <= 2
    # The common way to pick a scheduler: DDIMScheduler.from_pretrained gets diffusers' own defaults
    # (clip_sample=True, set_alpha_to_one=True) for every key the export leaves out.
    scheduler = diffusers.DDIMScheduler.from_pretrained(export / "diffusers", subfolder="scheduler")
    config = scheduler.config
    assert (config.clip_sample, config.set_alpha_to_one, config.thresholding) == (False, True, False)
    swapped = diffusers.StableDiffusionPipeline(**back.components)
    swapped.scheduler = scheduler  # after construction: the pipeline's own clip_sample correction is bypassed
    diff = np.abs(ours.astype(int) - draw(swapped, PROMPT, SEED, STEPS, GUIDANCE).astype(int)).max()
    print(f"{style} sample.py vs diffusers with DDIMScheduler.from_pretrained: max pixel difference {diff}/255")
    assert diff <= 2


def test_single_file_opens_in_diffusers(trained, one_thread):
    style, _original, _work, export, folder = trained
    single = diffusers.StableDiffusionPipeline.from_single_file(str(export / "sd.safetensors"),
                                                                 config=str(export / "diffusers"),
                                                                 local_files_only=True)
    for name in COMPONENTS:
        diff = max_state_diff(getattr(single, name), getattr(folder, name))
        print(f"{style} from_single_file {name}: max |single file - folder| = {diff:.2e}")
        assert diff < 1e-6
    assert single.scheduler.config.prediction_type == folder.scheduler.config.prediction_type
    a, b = draw(single, PROMPT, SEED, STEPS, GUIDANCE), draw(folder, PROMPT, SEED, STEPS, GUIDANCE)
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    print(f"{style} from_single_file picture: max pixel difference {diff}/255 from the folder's")
    assert diff <= 2
    from safetensors import safe_open

    with safe_open(str(export / "sd.safetensors"), "pt") as f:
        prefix = "cond_stage_model.model." if style == "sd2" else "cond_stage_model.transformer.text_model."
        assert any(k.startswith(prefix) for k in f.keys())


def test_bundle_and_single_file_are_valid_init_from(trained):
    from ldm.checkpoints.pipeline import load_pretrained

    _style, _original, work, export, _ = trained
    reference = load_pretrained(work / "original")
    for source in (export, export / "sd.safetensors"):
        found = load_pretrained(source)
        assert found.settings["prediction_type"] == reference.settings["prediction_type"]
        assert found.settings["scale_factor"] == pytest.approx(0.5)
        for ours, theirs in ((found.unet_state, reference.unet_state), (found.text_state, reference.text_state)):
            assert ours.keys() == theirs.keys()
            assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5


def test_published_single_file_without_our_metadata(trained, tmp_path):
    """A third-party SD file: the architecture from the shapes, heads and settings by SD's conventions."""
    from safetensors.torch import load_file, save_file

    from ldm.checkpoints.pipeline import SD_SCALE_FACTOR, load_pretrained

    style, _original, work, export, _ = trained
    state = load_file(str(export / "sd.safetensors"))
    save_file(state, str(tmp_path / "plain.safetensors"))  # our metadata gone
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    found, reference = load_pretrained(tmp_path / "plain.safetensors"), load_pretrained(work / "original")
    from_ckpt = load_pretrained(tmp_path / "plain.ckpt")
    assert from_ckpt.unet_config == found.unet_config and from_ckpt.text_config == found.text_config
    for key in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                "attention_resolutions", "transformer_depth", "context_dim"):
        assert found.unet_config[key] == reference.unet_config[key], key
    assert bool(found.unet_config.get("use_linear_in_transformer")) == (style == "sd2")
    assert found.unet_state.keys() == reference.unet_state.keys()
    text, ref_text = found.text_config, reference.text_config
    for key in ("width", "layers", "context_length", "act", "pad_id", "layer"):
        assert text[key] == ref_text[key], key
    assert found.settings["prediction_type"] == "epsilon" and found.settings["scale_factor"] == SD_SCALE_FACTOR
