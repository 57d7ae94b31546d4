"""Keep every DDP rank in one Hydra run directory.

Lightning's ddp strategy relaunches the entry script for ranks 1..N-1 with the original argv. Under
`-m` that argv is a whole sweep, and the run dir pattern holds `${now:...}`, so a child could start a
sweep of its own or write elsewhere. The parent therefore records, in the environment the children
inherit, the exact overrides of its own job plus its resolved run dir; a child replaces its argv with them.
Under srun (slurm/*.sbatch) every rank is started by SLURM with one command line whose run dir is fixed by
the job id; ranks other than 0 only get a job log of their own.
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
    srun_rank = os.environ.get("SLURM_PROCID", "0") if "SLURM_STEP_ID" in os.environ else "0"
    if srun_rank != "0" and not {"-m", "--multirun"} & set(sys.argv):
        # srun started every rank with the same command line (slurm/*.sbatch): one run dir (keyed by the job id),
        # but each rank its own job log, and only rank 0 writes the run's .hydra/ record.
        sys.argv += [f"hydra.job.name=train_rank{srun_rank}", "hydra.output_subdir=null"]
        return
    pinned = os.environ.get(CHILD_ARGV_ENV)
    if not pinned or os.environ.get("LOCAL_RANK", "0") == "0":
        return
    rank = os.environ["LOCAL_RANK"]
    sys.argv = [sys.argv[0], *json.loads(pinned), f"hydra.job.name=train_rank{rank}"]
