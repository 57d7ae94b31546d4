"""Where runs, checkpoints and exports live, and which checkpoint a resumed run continues from."""

from __future__ import annotations

from pathlib import Path

from ldm.checkpoints.files import RefusedFileError, load_torch_file


def checkpoint_step(path: str | Path) -> int:
    """The global step recorded in a Lightning checkpoint (-1 when the file cannot be read as one).

    Read as data only (a file that would run code is refused, with a warning, and never the one to resume) and
    memory-mapped: only the pickled metadata is read, not the tensors, so scanning a run dir stays cheap.
    """
    try:
        state = load_torch_file(path)
    except RefusedFileError as err:
        print(f"[ldm] warning: skipping {err}")
        return -1
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else -1


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's resumable checkpoints: checkpoints/*.ckpt and Lightning's SLURM-requeue hpc_ckpt_N.ckpt."""
    root = Path(run_dir)
    candidates = [*root.glob("checkpoints/*.ckpt"), *root.glob("hpc_ckpt_*.ckpt")]
    return [p for p in candidates if not p.name.startswith("nonfinite-")]  # a stopped run stays stopped


def furthest_checkpoint(paths: list[Path]) -> Path | None:
    """The checkpoint with the highest global step; the newest file among equals; foreign files never.

    Modification time alone is not enough: a file written late can hold an old state (a process with a
    stale copy of the trainer, a copy restored by hand), and resuming from it would silently throw away
    the steps after it. When the newest file is behind the chosen one, that is said out loud.
    """
    stamped = [(step, p.stat().st_mtime_ns, p) for p in paths if (step := checkpoint_step(p)) >= 0]
    if not stamped:  # nothing here is a checkpoint this project wrote
        return None
    step, _, chosen = max(stamped, key=lambda s: (s[0], s[1]))
    newest_step, _, newest = max(stamped, key=lambda s: s[1])
    if newest_step < step:
        print(f"[ldm] warning: the newest checkpoint {newest} holds step {newest_step}, behind {chosen.name} "
              f"(step {step}); resuming from the furthest one, {chosen}")
    return chosen


def find_run_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of one run to continue from (`ckpt=auto`, and a requeued SLURM job)."""
    return furthest_checkpoint(run_checkpoints(run_dir))


def find_latest_checkpoint(runs: str | Path, stage: str) -> Path | None:
    """`ckpt=last`: the run of this stage that saved most recently, then its furthest checkpoint.

    Runs are told apart by when they last saved (a new run is the one to continue, even with fewer steps
    than an old one); inside that run the global step decides, as for `find_run_checkpoint`.
    """
    runs_with = [(max(p.stat().st_mtime_ns for p in ckpts), run)
                 for run in (Path(runs) / stage).glob("*/") if (ckpts := run_checkpoints(run))]
    if not runs_with:
        return None
    return find_run_checkpoint(max(runs_with)[1])
