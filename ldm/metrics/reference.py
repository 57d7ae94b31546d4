"""FID reference statistics on disk: computed once per data set and extractor, reused by every evaluation.

A file holds the real side of torchmetrics' FID state (feature sum, sum of outer products, count; float64)
as safetensors, with JSON metadata saying what it was computed from. Its name is a hash of that description:
the shard list with each local file's size and mtime, the image size, the sample limit and the extractor
(with its weights file's size and mtime). A changed shard or another extractor misses the cache instead of
returning stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STATS_VERSION = 1
FID_DEFAULTS = {"inception": 2048, "small": 64}  # build_fid's feature counts when a config leaves them out


def _file_signature(path: str | None) -> dict[str, Any] | None:
    """(path, size, mtime) of a local file: what tells an edited file from the one a key was made with."""
    if not path:
        return None
    local = path[len("file:"):] if path.startswith("file:") else path
    try:
        stat = os.stat(local)
    except OSError:  # a URL or a pipe: only its name can be part of the key
        return {"path": path}
    return {"path": str(Path(local).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fid_settings(fid: dict[str, Any] | None) -> dict[str, Any]:
    """A FID config with build_fid's defaults filled in: two configs that build the same extractor compare equal."""
    fid = {k: v for k, v in (fid or {}).items() if v is not None and k != "enabled"}
    extractor = fid.get("extractor", "inception")
    out = {"extractor": extractor, "num_features": int(fid.get("num_features") or FID_DEFAULTS.get(extractor, 2048))}
    if fid.get("feature_extractor_weights_path"):
        out["feature_extractor_weights_path"] = str(fid["feature_extractor_weights_path"])
    return out


def describe(urls: list[str], resolution: int, limit: int | None, fid: dict[str, Any]) -> dict[str, Any]:
    """What a reference statistics file is computed from; its hash names the file."""
    settings = fid_settings(fid)
    weights = _file_signature(settings.get("feature_extractor_weights_path"))
    return {"version": STATS_VERSION, "shards": [_file_signature(u) for u in urls], "resolution": int(resolution),
            "limit": limit, "fid": {**settings, "weights": weights}}


def reference_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def stats_path(cache_dir: str | Path, description: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"fid_ref_{reference_key(description)}.safetensors"


def save_stats(path: str | Path, stats: dict[str, torch.Tensor], description: dict[str, Any]) -> Path:
    """Atomically: a concurrent evaluation reads the old file or the new one, never half of one."""
    from ldm.checkpoints.files import save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in stats.items()}
    return save_safetensors(tensors, Path(path), {"description": json.dumps(description, sort_keys=True)})


def load_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    if "description" not in meta:
        raise ValueError(f"{path}: not a reference statistics file of ldm.evaluate (no description metadata)")
    return tensors, json.loads(meta["description"])


def check_extractor(description: dict[str, Any], fid: dict[str, Any], path: str | Path) -> None:
    """Statistics from another extractor give a meaningless FID: refuse them, saying which setting differs."""
    saved = {k: v for k, v in description.get("fid", {}).items() if k != "weights"}
    wanted = fid_settings(fid)
    if saved != wanted:
        raise ValueError(f"ref_stats={path} was computed with FID settings {saved}, this evaluation uses {wanted} "
                         f"(metrics.fid): compute new statistics with ref_shards=... instead")
