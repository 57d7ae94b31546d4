"""Checkpoint files that are whole or absent: a kill during a save leaves the previous checkpoint usable.

Lightning writes checkpoints (ModelCheckpoint, `last.ckpt`, the SLURM requeue handler's `hpc_ckpt_N.ckpt`)
through the strategy's CheckpointIO. Its default opens the target and writes into it, so a job killed
mid-save (preemption, a time limit, an OOM kill) leaves a truncated `last.ckpt` that the requeued job then
fails to load. This one writes a temporary file beside the target, flushes it to disk and renames it over
the target: a rename within a directory is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".partial"


def partial_name(name: str) -> str:
    """The temporary file's name: hidden, ends in .partial, and without "ckpt_".

    Lightning numbers the next `hpc_ckpt_N.ckpt` (and finds the one to resume) from the digits after "ckpt_"
    in every file name of the run dir; a temporary named after its target would count as version N<pid>.
    """
    return f".{name.replace('ckpt_', 'ckpt-')}.{os.getpid()}{TMP_SUFFIX}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with write-to-temporary-then-rename for local paths (remote URLs: Lightning's way)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(partial_name(target.name))
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power loss right after it would otherwise be allowed to undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
