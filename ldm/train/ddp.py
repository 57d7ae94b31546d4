"""Keep every DDP rank in one Hydra run directory.

Lightning's ddp strategy relaunches the entry script for ranks 1..N-1 with the original argv. Under
`-m` that argv is a whole sweep, and the run dir pattern holds `${now:...}`, so a child could start a
sweep of its own or write elsewhere. The parent therefore records, in the environment the children
inherit, the exact overrides of its own job plus its resolved run dir; a child replaces its argv with them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHILD_ARGV_ENV = "LDM_DDP_CHILD_ARGV"


def pin_run_dir_for_children(run_dir: Path) -> None:
    """Called by the launching process before fit."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return  # not under Hydra: nothing to pin
    pinned = [o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra.job.name="))]
    pinned += [f'hydra.run.dir="{run_dir.resolve()}"', "hydra.output_subdir=null"]
    os.environ[CHILD_ARGV_ENV] = json.dumps(pinned)


def apply_pinned_argv() -> None:
    """Called first thing in train.py: a relaunched DDP child takes its parent's job, not the command line."""
    pinned = os.environ.get(CHILD_ARGV_ENV)
    if not pinned or os.environ.get("LOCAL_RANK", "0") == "0":
        return
    rank = os.environ["LOCAL_RANK"]
    sys.argv = [sys.argv[0], *json.loads(pinned), f"hydra.job.name=train_rank{rank}"]
