"""Summarize the last `make train`: where each minute went, and what its samples drew.

    python bench/pipeline_report.py [--runs runs] [--samples samples/make-train]

Per stage: its own wall time (summary.json), steps and metrics; the time to encode the data set into latents
(from the stage=vae summary to the last latents.json); the sampling step's time (from the stage=ldm
summary to the last sample written, start-up included) and the whole pipeline's span (stage=vae start to the
manifest). Then the samples' prompt accuracy by the shapes analyzer, re-scored from the PNGs, and what failed:
per attribute, the (asked -> drawn) confusions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def latest_summary(runs: Path, stage: str) -> tuple[dict, float] | None:
    """The newest finished run of a stage: its summary and the time it was written."""
    found = sorted((runs / stage).glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return (json.loads(found[-1].read_text()), found[-1].stat().st_mtime) if found else None


def confusion(samples: Path) -> tuple[dict[str, float], dict[str, Counter]] | None:
    """Accuracy and (asked, drawn) counts per attribute, scored from the PNGs the manifest lists."""
    from PIL import Image

    from ldm.data.analyze import analyze_image
    from ldm.data.shapes import parse_caption

    manifest = samples / "manifest.jsonl"
    if not manifest.exists():
        return None
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    hits: Counter = Counter()
    errors: dict[str, Counter] = {k: Counter() for k in ("color", "background", "shape")}
    for rec in records:
        want = parse_caption(rec["prompt"])
        got = analyze_image(Image.open(samples / rec["file"]).convert("RGB"))
        ok = [want[k] == got[k] for k in errors]
        for key, good in zip(errors, ok, strict=True):
            hits[key] += good
            if not good:
                errors[key][(want[key], got[key])] += 1
        hits["all"] += all(ok)
    return {k: hits[k] / len(records) for k in ("color", "background", "shape", "all")}, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--samples", default="samples/make-train")
    parser.add_argument("--latents", default="data/shapes-latents", help="where make train encodes the data set")
    args = parser.parse_args()
    runs, samples, latents = Path(args.runs), Path(args.samples), Path(args.latents)
    found = {}
    for stage in ("vae", "ldm"):
        s = latest_summary(runs, stage)
        if s is None:
            print(f"stage={stage}: no finished run under {runs}/{stage}")
            continue
        found[stage] = s
        summary = s[0]
        keys = [k for k in summary["metrics"] if "accuracy" in k or k in ("val/psnr", "val/loss", "val/l1")]
        shown = ", ".join(f"{k}={summary['metrics'][k]:.3f}" for k in sorted(keys))
        print(f"stage={stage}: {summary['wall_seconds']:.0f} s, {summary['global_step']} steps; {shown}")
    encoded = [latents / split / "latents.json" for split in ("train", "val")]
    if "vae" in found and all(p.exists() for p in encoded):
        took = max(p.stat().st_mtime for p in encoded) - found["vae"][1]
        if took > 0:  # encoded after this stage=vae run finished
            print(f"encoding the data set into {latents} (python -m ldm.data.latents, start-up included): {took:.0f} s")
    manifest = samples / "manifest.jsonl"
    if manifest.exists() and "ldm" in found:
        sampling = manifest.stat().st_mtime - found["ldm"][1]
        print(f"sampling (sample.py, start-up included): {sampling:.0f} s")
        if "vae" in found:
            vae, vae_done = found["vae"]
            span = manifest.stat().st_mtime - (vae_done - vae["wall_seconds"])
            print(f"stage=vae start to last sample: {span:.0f} s ({span / 60:.1f} min; without the venv and the "
                  f"data set, and the few seconds each process takes to start)")
    acc = samples / "prompt_accuracy.json"
    if acc.exists():
        n = sum(1 for _ in manifest.open()) if manifest.exists() else "?"
        values = json.loads(acc.read_text())
        values.pop("confusion", None)  # sample.py's table; re-scored from the PNGs below
        print(f"samples ({n} images in {samples}): " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    scored = confusion(samples)
    if scored is not None:
        values, errors = scored
        print("re-scored from the PNGs: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
        for key, counter in errors.items():
            if counter:
                print(f"  {key} misses (asked -> drawn): " +
                      ", ".join(f"{w}->{g} x{c}" for (w, g), c in counter.most_common(8)))


if __name__ == "__main__":
    main()
