import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")


def run_script(script: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py / sample.py as a user would, with Hydra overrides."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_scripts_together(*calls: tuple[str, list[str], Path, bool]) -> list[subprocess.CompletedProcess]:
    """run_script for independent (script, overrides, cwd, check) calls, all at once.

    Each run spends its first ~10 s importing Lightning on one core; side by side, two runs use both cores of a
    2-core CI machine instead of leaving one idle.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run_script, script, *overrides, cwd=cwd, check=check)
                   for script, overrides, cwd, check in calls]
        return [f.result() for f in futures]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    from ldm.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, num_train=96, num_val=24, resolution=16, seed=1, shard_size=32)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to OpenMP barriers stalling on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Every parameter random: fresh models have zero-initialised layers that would hide mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


class TinyImageModule(pl.LightningModule):
    """The smallest model that consumes image batches: data tests drive the real Lightning loops with it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def block_runs(model: torch.nn.Module, step) -> list[int]:
    """How often each UNet ResBlock and transformer block ran during `step()` (a forward and backward).

    Gradient checkpointing shows as 2 for every block (the forward, then its recomputation in the backward);
    without it each runs once, so a `use_checkpoint` that is silently ignored cannot pass for checkpointing.
    """
    from ldm.diffusion.unet import BasicTransformerBlock, ResBlock

    blocks = [m for m in model.modules() if isinstance(m, ResBlock | BasicTransformerBlock)]
    runs = [0] * len(blocks)

    def counter(i: int):
        def hook(module, args):
            runs[i] += 1
        return hook

    handles = [b.register_forward_pre_hook(counter(i)) for i, b in enumerate(blocks)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    assert blocks, "no ResBlock or transformer block found"
    return runs
