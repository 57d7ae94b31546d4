import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    from ldm.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, num_train=96, num_val=24, resolution=16, seed=1, shard_size=32)
    return root
