"""Where runs, checkpoints and exports live."""

from __future__ import annotations

from pathlib import Path


def find_latest_checkpoint(runs: str | Path, stage: str) -> Path | None:
    """Newest `last.ckpt` (else any .ckpt) under runs/<stage>/*/checkpoints, by modification time."""
    root = Path(runs) / stage
    candidates = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        candidates = sorted(root.glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def find_run_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of one run: its checkpoints/*.ckpt or Lightning's SLURM-requeue hpc_ckpt_N.ckpt.

    Newest by modification time: checkpoints are written whole (AtomicCheckpointIO), so the last one written
    is the furthest along. `ckpt=auto` uses this so that a requeued SLURM job continues its own run.
    """
    root = Path(run_dir)
    candidates = [*root.glob("checkpoints/*.ckpt"), *root.glob("hpc_ckpt_*.ckpt")]
    candidates = [p for p in candidates if not p.name.startswith("nonfinite-")]  # a stopped run stays stopped
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
