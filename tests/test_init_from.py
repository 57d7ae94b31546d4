"""model.init_from / model.unet.init_from at start-up: what comes from the files, what the command line wins,
which contradictions stop the run (naming the key); and which models a pipeline export skips, with the reason."""

import json

import pytest
from hydra import compose, initialize_config_dir

from ldm.train.checks import ConfigError
from ldm.train.init_from import plan_init

from .conftest import ROOT, run_scripts_together
from .ldm_factory import tiny_ldm
from .sd_pipelines import build_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "pipeline"
    build_pipeline("sd1", folder)
    return folder


def plan(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=ldm", *overrides])
    return plan_init(cfg, [o for o in overrides if not o.startswith("experiment=")]), cfg


def test_files_decide_architecture_and_settings(sd1_folder):
    found, cfg = plan(f"model.init_from={sd1_folder}", "experiment=sd15_finetune")
    assert found.kwargs["unet"]["model_channels"] == 32 and found.kwargs["unet"]["channel_mult"] == [1, 2]
    assert found.kwargs["unet"]["use_checkpoint"] is True  # a run-time key: the experiment's, kept
    assert found.kwargs["text_encoder"]["width"] == 32 and found.kwargs["text_encoder"]["act"] == "quick_gelu"
    assert found.kwargs["scale_factor"] == pytest.approx(0.5)  # the file's, over the preset's 0.18215
    applied = found.apply(cfg)
    assert applied.model.unet.model_channels == 32 and applied.stage.module.unet.model_channels == 32
    assert applied.stage.module.scale_factor == pytest.approx(0.5)


def test_command_line_setting_wins(sd1_folder, capsys):
    found, _ = plan(f"model.init_from={sd1_folder}", "stage.module.prediction_type=v_prediction",
                    "model.unet.model_channels=32")  # agreeing with the files is fine
    assert "prediction_type" not in found.kwargs and "schedule" in found.kwargs
    assert "stage.module.prediction_type: the command line's value wins" in capsys.readouterr().out


@pytest.mark.parametrize("override, key", [("model.unet.model_channels=64", "model.unet.model_channels"),
                                           ("model.text_encoder.layers=5", "model.text_encoder.layers"),
                                           ("model.unet.init_from=/elsewhere", "model.unet.init_from")])
def test_contradiction_stops_at_start_naming_the_key(sd1_folder, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan(f"model.init_from={sd1_folder}", override)


def test_autoencoder_contradiction_names_the_key(sd1_folder):
    found, cfg = plan(f"model.init_from={sd1_folder}", "model.autoencoder.ch=64")
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.ch=64 contradicts"):
        found.check_autoencoder(cfg, {"ch": 32, "resolution": 16})
    found.check_autoencoder(cfg, {"ch": 64, "resolution": 256})  # agreeing (resolution follows the data)


def test_unet_alone(sd1_folder):
    found, _ = plan(f"model.unet.init_from={sd1_folder}")
    assert found.text_state is None and found.autoencoder_path is None and set(found.kwargs) == {"unet"}
    assert found.unet_state["input_blocks.0.0.weight"].shape[0] == 32
    with pytest.raises(ConfigError, match=r"model\.unet\.init_from=.*cannot load a UNet"):
        plan(f"model.unet.init_from={sd1_folder / 'nothing'}")


@pytest.mark.parametrize("kwargs, reason", [
    (dict(prediction_type="flow", sampler="euler"), "flow"),
    (dict(text_encoder={"kind": "class", "num_classes": 3, "embed_dim": 32}), "kind=class"),
])
def test_pipeline_export_skipped_with_reason(kwargs, reason, tmp_path, capsys):
    from ldm.checkpoints.bundle import write_outside_layouts

    write_outside_layouts(tiny_ldm(**kwargs), tmp_path)
    out = capsys.readouterr().out
    assert "no diffusers pipeline export" in out and "no SD single file export" in out and reason in out
    assert (tmp_path / "diffusers" / "unet" / "config.json").exists()  # the UNet alone still goes out
    assert not (tmp_path / "diffusers" / "model_index.json").exists() and not (tmp_path / "sd.safetensors").exists()


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2") / "pipeline"
    build_pipeline("sd2", folder)
    return folder


def test_sampler_follows_the_loaded_prediction_type(sd1_folder, sd2_folder, capsys):
    """The shapes recipe's flow sampler (euler_ancestral) gives way to the files' epsilon / v_prediction."""
    for folder, prediction in ((sd1_folder, "epsilon"), (sd2_folder, "v_prediction")):
        found, cfg = plan(f"model.init_from={folder}")
        assert cfg.stage.module.sampler == "euler_ancestral"  # the recipe's, for its flow model
        applied = found.apply(cfg)
        assert applied.stage.module.prediction_type == prediction and applied.stage.module.sampler == "ddim"
    assert "stage.module.sampler: 'ddim'" in capsys.readouterr().out


def test_command_line_sampler_wins_or_stops(sd1_folder):
    found, cfg = plan(f"model.init_from={sd1_folder}", "stage.module.sampler=dpmpp_2m")
    assert "sampler" not in found.kwargs and found.apply(cfg).stage.module.sampler == "dpmpp_2m"
    with pytest.raises(ConfigError, match=r"stage\.module\.sampler='euler' \(command line\) cannot sample .*"
                                          r"'epsilon'"):
        plan(f"model.init_from={sd1_folder}", "stage.module.sampler=euler")
    # the command line's prediction type wins over the files', and the recipe's sampler fits it
    found, cfg = plan(f"model.init_from={sd1_folder}", "stage.module.prediction_type=flow")
    assert "sampler" not in found.kwargs and found.apply(cfg).stage.module.sampler == "euler_ancestral"


def test_train_py_starts_from_epsilon_and_v_pipelines_on_builtin_data(sd1_folder, sd2_folder, tiny_shapes, tmp_path):
    """No setting on the command line: only the run's size (one step, tiny batch) and where the data is."""
    size = ["logger=csv", "trainer.accelerator=cpu", "trainer.max_steps=1", "data.batch_size=2",
            "data.num_workers=0", f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
            "checkpoint.every_n_train_steps=100", "paths.runs=runs"]
    calls = [("train.py", ["stage=ldm", f"model.init_from={folder}", *size], tmp_path / name, True)
             for name, folder in (("sd1", sd1_folder), ("sd2", sd2_folder))]
    for _, _, cwd, _ in calls:
        cwd.mkdir()
    run_scripts_together(*calls)
    for name, prediction in (("sd1", "epsilon"), ("sd2", "v_prediction")):
        meta = json.loads(next((tmp_path / name / "runs" / "ldm").glob("*/export/unet.json")).read_text())
        assert meta["prediction_type"] == prediction and meta["module"]["sampler"] == "ddim", name
