"""Summarize the last `make train`: wall time of each stage and the prompt accuracy of its samples.

    python bench/pipeline_report.py [--runs runs] [--samples samples/make-train]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def latest_summary(runs: Path, stage: str) -> dict | None:
    found = sorted((runs / stage).glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--samples", default="samples/make-train")
    args = parser.parse_args()
    for stage in ("vae", "ldm"):
        s = latest_summary(Path(args.runs), stage)
        if s is None:
            print(f"stage={stage}: no finished run under {args.runs}/{stage}")
            continue
        keys = [k for k in s["metrics"] if "accuracy" in k or k in ("val/psnr", "val/loss", "val/l1")]
        shown = ", ".join(f"{k}={s['metrics'][k]:.3f}" for k in sorted(keys))
        print(f"stage={stage}: {s['wall_seconds']:.0f} s, {s['global_step']} steps; {shown}")
    acc = Path(args.samples) / "prompt_accuracy.json"
    if acc.exists():
        manifest = Path(args.samples) / "manifest.jsonl"
        n = sum(1 for _ in manifest.open()) if manifest.exists() else "?"
        values = json.loads(acc.read_text())
        table = values.pop("confusion", None)  # absent in files written before the confusion table
        print(f"samples ({n} images in {args.samples}): " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
        for attribute, rows in (table or {}).items():  # {attribute: {wanted: {got: count}}}
            shown = "; ".join(f"{want} -> " + ", ".join(f"{got} x{n}" for got, n in got_n.items() if got != want)
                              for want, got_n in rows.items() if set(got_n) - {want})
            if shown:
                print(f"  {attribute} misses: {shown}")


if __name__ == "__main__":
    main()
