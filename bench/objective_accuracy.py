"""Prompt accuracy on the built-in shapes data after the default stage=ldm run, per objective.

Trains one autoencoder (the default stage=vae run), then the default stage=ldm run three times on it:
epsilon (the default), experiment=v_prediction and experiment=flow. Each model then samples the same
64 shapes prompts with several samplers; the shapes analyzer scores each image against its prompt.
Writes a JSON and a markdown table. About 35 minutes on 2 CPU cores:
`python bench/objective_accuracy.py --out runs/objectives`   (--skip-train reuses the runs already there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ~recipe: the paper's defaults, not the built-in shapes recipe (conf/recipe/shapes_*.yaml)
RUNS = {"epsilon": ["~recipe"], "v_prediction": ["~recipe", "experiment=v_prediction"],
        "flow": ["~recipe", "experiment=flow"]}
SAMPLERS = {"epsilon": [("ddim", 50), ("dpmpp_2m", 20)], "v_prediction": [("ddim", 50), ("dpmpp_2m", 20)],
            "flow": [("euler", 50), ("heun", 10)]}


def train(out: Path, stage: str, name: str, extra: list[str]) -> float:
    args = [sys.executable, str(ROOT / "train.py"), f"stage={stage}", "logger=csv", f"paths.runs={out}",
            f"paths.exports={out}/exports", f"hydra.run.dir={out}/{name}", *extra]
    start = time.perf_counter()
    print("+", " ".join(args[1:]), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)
    return time.perf_counter() - start


def evaluate(ckpt: Path, samplers: list[tuple[str, int]], num_prompts: int) -> list[dict]:
    from ldm.data.analyze import prompt_accuracy
    from ldm.data.shapes import prompt_set
    from ldm.diffusion.module import LatentDiffusionModule

    module = LatentDiffusionModule.load_from_checkpoint(str(ckpt), map_location="cpu", autoencoder_path=None,
                                                        weights_only=True).eval()
    prompts = prompt_set(num_prompts, seed=0)
    rows = []
    for sampler, steps in samplers:
        start = time.perf_counter()
        images = module.generate(prompts, seed=0, sampler=sampler, num_inference_steps=steps)
        seconds = (time.perf_counter() - start) / len(prompts)
        acc = prompt_accuracy(images, prompts)
        rows.append({"sampler": sampler, "steps": steps, "s_per_image": round(seconds, 4),
                     **{k: round(float(v), 3) for k, v in acc.items()}})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "objectives")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--only", default=",".join(RUNS), help="comma-separated objectives")
    args = ap.parse_args()
    out = args.out.resolve()
    report: dict = {"train_seconds": {}, "results": {}}
    if not args.skip_train and not (out / "exports" / "autoencoder").exists():
        report["train_seconds"]["vae"] = round(train(out, "vae", "vae", ["~recipe"]))
    for name in args.only.split(","):
        if not args.skip_train:
            report["train_seconds"][name] = round(train(out, "ldm", name, RUNS[name]))
        ckpt = out / name / "checkpoints" / "last.ckpt"
        report["results"][name] = evaluate(ckpt, SAMPLERS[name], args.prompts)
    (out / "objective_accuracy.json").write_text(json.dumps(report, indent=2))
    lines = ["| objective | sampler | steps | s/image | background | colour | shape | all |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in report["results"].items():
        for r in rows:
            lines.append(f"| {name} | {r['sampler']} | {r['steps']} | {r['s_per_image']} | {r.get('background')} | "
                         f"{r.get('color')} | {r.get('shape')} | {r.get('all')} |")
    (out / "objective_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
