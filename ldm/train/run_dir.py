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
