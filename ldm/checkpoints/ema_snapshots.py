"""Post-hoc EMA snapshots on disk: RUN/posthoc_ema/<role>-sigma<sigma_rel>-step<step>.safetensors.

One small safetensors file per profile and snapshot, written atomically; its metadata says what the weights
are (sigma_rel, gamma, the profile's update count t, the global step) so reconstruction reads nothing else.
role is "profile" (a reconstruction basis) or "tracked" (an opt-in directly kept EMA, for checking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoints.files import save_safetensors

SNAPSHOT_DIR = "posthoc_ema"
ROLES = ("profile", "tracked")


@dataclass(frozen=True)
class Snapshot:
    path: Path
    role: str
    sigma_rel: float
    gamma: float
    t: int          # the profile's update count: the t of its weights w_tau(t)
    step: int       # the trainer's global step when it was written
    buffers: tuple[str, ...]


def snapshot_name(role: str, sigma_rel: float, step: int) -> str:
    return f"{role}-sigma{sigma_rel:.4f}-step{step:09d}.safetensors"


def write_snapshot(folder: str | Path, role: str, sigma_rel: float, gamma: float, t: int, step: int,
                   state: dict[str, torch.Tensor], buffers: list[str]) -> Path:
    """One profile's averaged weights, atomically (tmp + rename): a reader never sees half a snapshot."""
    if role not in ROLES:
        raise ValueError(f"snapshot role must be one of {ROLES}, got {role!r}")
    meta = {"format": "pt", "role": role, "sigma_rel": repr(float(sigma_rel)), "gamma": repr(float(gamma)),
            "t": str(int(t)), "step": str(int(step)), "buffers": json.dumps(sorted(buffers))}
    return save_safetensors(state, Path(folder) / snapshot_name(role, sigma_rel, step), meta)


def read_snapshot(path: str | Path) -> Snapshot:
    """The metadata of one snapshot file (its tensors stay on disk)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return Snapshot(path=path, role=meta["role"], sigma_rel=float(meta["sigma_rel"]), gamma=float(meta["gamma"]),
                        t=int(meta["t"]), step=int(meta["step"]), buffers=tuple(json.loads(meta["buffers"])))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a post-hoc EMA snapshot (metadata {sorted(meta)}: {err})") from None


def list_snapshots(folder: str | Path, role: str | None = None) -> list[Snapshot]:
    """Every snapshot in a folder (of one role), by step then sigma_rel; temporary files are not snapshots."""
    found = [read_snapshot(p) for p in sorted(Path(folder).glob("*.safetensors")) if not p.name.startswith(".")]
    return sorted((s for s in found if role is None or s.role == role), key=lambda s: (s.step, s.sigma_rel))


def combine(snapshots: list[Snapshot], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """sum_i x_i * snapshot_i, key by key in float64 (one key of every file in memory at a time), cast back to
    each tensor's dtype. Buffers are copied from the newest snapshot: they were copied, never averaged."""
    from contextlib import ExitStack

    from safetensors import safe_open

    newest = max(range(len(snapshots)), key=lambda i: snapshots[i].step)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(s.path), framework="pt")) for s in snapshots]
        keys = list(files[newest].keys())
        for f, s in zip(files, snapshots, strict=True):
            if set(f.keys()) != set(keys):
                raise ValueError(f"{s.path}: holds other tensors than {snapshots[newest].path}: snapshots of "
                                 f"different models cannot be combined")
        out = {}
        for key in keys:
            first = files[newest].get_tensor(key)
            if key in snapshots[newest].buffers or not first.is_floating_point():
                out[key] = first
                continue
            total = torch.zeros(first.shape, dtype=torch.float64)
            for f, x in zip(files, coefficients, strict=True):
                total += float(x) * f.get_tensor(key).double()
            out[key] = total.to(first.dtype)
    return out


def snapshot_profiles(folder: str | Path, posthoc: object, step: int) -> list[Path]:
    """Every profile (and tracked profile) of a PosthocEMA, one file each, at this global step."""
    written = []
    for role, profiles in (("profile", posthoc.profiles), ("tracked", posthoc.tracked)):
        for profile in profiles:
            state, buffers = profile.tensors()
            written.append(write_snapshot(folder, role, profile.sigma_rel, profile.gamma, profile.updates(), step,
                                          state, buffers))
    return written


def prune_after(folder: str | Path, step: int) -> list[Path]:
    """Remove snapshots written after `step`: a run resumed from `step` writes its own, and until it does, the
    folder holds only snapshots of the weights the resumed profiles descend from."""
    removed = []
    if Path(folder).is_dir():
        for snap in list_snapshots(folder):
            if snap.step > step:
                snap.path.unlink()
                removed.append(snap.path)
    return removed


def carry_over(source: str | Path, folder: str | Path, step: int) -> list[Path]:
    """A run resumed into a new run dir starts with the old run's snapshots up to the resumed `step` (hard links
    where the file system allows, else copies), so reconstruction finds the whole history in one place."""
    import os
    import shutil

    copied = []
    if not Path(source).is_dir() or Path(source).resolve() == Path(folder).resolve():
        return copied
    Path(folder).mkdir(parents=True, exist_ok=True)
    for snap in list_snapshots(source):
        target = Path(folder) / snap.path.name
        if snap.step <= step and not target.exists():
            try:
                os.link(snap.path, target)
            except OSError:
                shutil.copy2(snap.path, target)
            copied.append(target)
    return copied
