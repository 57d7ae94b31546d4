"""trainer=cpu|gpu|ddp|fsdp compose with either stage, and the SLURM launcher's settings follow the trainer."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from ldm.train.faults import build_strategy

from .conftest import ROOT


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("stage", ["vae", "ldm"])
@pytest.mark.parametrize("preset, accelerator, strategy, precision", [
    ("cpu", "cpu", "auto", "32-true"), ("gpu", "gpu", "auto", "bf16-mixed"),
    ("ddp", "gpu", "ddp", "bf16-mixed"), ("fsdp", "gpu", "fsdp", "bf16-mixed")])
def test_trainer_presets(stage, preset, accelerator, strategy, precision):
    cfg = _compose(f"stage={stage}", f"trainer={preset}", "trainer.devices=2")
    t = cfg.trainer
    assert (t.accelerator, t.strategy, t.precision) == (accelerator, strategy, precision)
    # The stage's step count survives the preset: the built-in recipe's for data=shapes (the default data).
    own = OmegaConf.load(ROOT / "conf" / "recipe" / f"shapes_{stage}.yaml").trainer.max_steps
    assert t.max_steps == own
    built = build_strategy(t.strategy, cfg.faults.collective_timeout_s, devices=t.devices, num_nodes=t.num_nodes)
    # Two devices: a strategy object carrying faults.collective_timeout_s (auto means ddp there).
    assert isinstance(built, FSDPStrategy if strategy == "fsdp" else DDPStrategy)


def test_slurm_launcher_follows_the_trainer():
    cfg = _compose("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    # Lightning's SIGUSR1 requeue handler, not submitit's USR2: one --signal line, USR1, and --requeue.
    assert launcher["additional_parameters"] == {"signal": "USR1@90", "requeue": True}
    assert launcher["_target_"].endswith("SlurmLauncher")
