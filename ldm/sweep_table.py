"""The table a `-m` sweep of `python -m ldm.evaluate` prints when it ends: one line per point.

It reads each job's metrics.json from the sweep directory, so it also works when the jobs ran elsewhere
(the SLURM launcher): whatever finished is listed, in job order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """(point, fid, clip_score, prompt accuracy) of every job that wrote metrics.json, in job order."""
    rows = []
    found = [p for p in Path(sweep_dir).glob("*/metrics.json") if p.parent.name.isdigit()]
    for path in sorted(found, key=lambda p: int(p.parent.name)):
        result = json.loads(path.read_text())
        values = result.get("metrics", {})
        rows.append({"job": int(path.parent.name), "overrides": result.get("overrides", []),
                     "fid": values.get("fid"), "clip_score": values.get("clip_score"),
                     "prompt_accuracy": (values.get("prompt_accuracy") or {}).get("all")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Only the overrides that differ between points name a point (ckpt=..., seed=...)."""
    if not rows:
        return "no job of this sweep wrote metrics.json"
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    points = [" ".join(o for o in r["overrides"] if o not in common) or "(defaults)" for r in rows]
    width = max(len("point"), *(len(p) for p in points))
    lines = [f"{'job':>4}  {'point':<{width}}  {'FID':>10}  {'CLIP':>10}  {'prompt acc':>10}"]
    for row, point in zip(rows, points, strict=True):
        cells = [f"{v:10.4f}" if isinstance(v, float) else f"{'-':>10}"
                 for v in (row["fid"], row["clip_score"], row["prompt_accuracy"])]
        lines.append(f"{row['job']:>4}  {point:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        table = format_table(sweep_rows(sweep_dir))
        (sweep_dir / "table.txt").write_text(table + "\n")
        print(f"[ldm] sweep {sweep_dir}:\n{table}", flush=True)
