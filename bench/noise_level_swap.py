"""Which noise levels does a short run get wrong? Sample with one model above flow time t = a and another below.

Two stage-2 models saved by `bench/learning_curve.py` (--out/models/NAME.pt), a short run and a longer one, draw
the same 64 prompts from the same noise with the same sampler; for each split point a the long model denoises
t > a and the short one t <= a (and the reverse). If "long above a" scores like the long model alone, the short
model's weakness lies below a; this is how the recipe's training-time distribution was chosen (docs/results.md).

    python bench/noise_level_swap.py runs/r1/models/shapes.pt runs/r1x4/models/shapes.pt --splits 0.8,0.6,0.4,0.2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def load(path: Path, autoencoder: str, overrides: list[str]) -> Any:
    """A bench model with the recipe's architecture, weights (EMA included) from `path`."""
    import learning_curve as lc

    from ldm.train.cli import build_module

    module = build_module(lc.compose([o.format(f2=autoencoder) for o in lc.SHAPES] + overrides))
    module._ensure_scale_factor({"moments": torch.ones(2, 2 * module.autoencoder.latent_channels, 2, 2)})
    module.load_state_dict(torch.load(path, weights_only=True))
    return module.eval()


def guided(module: Any, prompts: list[str], scale: float, interval: list[float]) -> Any:
    from ldm.diffusion.samplers import classifier_free_guidance

    cond = module.encode_text(prompts, use_ema=True)
    uncond = module.encode_text([""] * len(prompts), use_ema=True)
    return classifier_free_guidance(module.ema.model, cond, uncond, scale, interval=interval,
                                    time_scale=module.schedule.time_scale)


@torch.no_grad()
def swapped_accuracy(short: Any, long: Any, prompts: list[str], split: float, long_above: bool,
                     args: argparse.Namespace) -> dict[str, float]:
    """Mean analyzer accuracy over the seeds when `long` denoises t > split (long_above) or t <= split."""
    from ldm.data.analyze import prompt_accuracy
    from ldm.diffusion.samplers import sample

    interval = [args.interval[0], args.interval[1]]
    f_short, f_long = guided(short, prompts, args.guidance, interval), guided(long, prompts, args.guidance, interval)
    scale = short.schedule.time_scale

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        high = float(t.reshape(-1)[0]) / scale > split
        return (f_long if high == long_above else f_short)(x, t)

    side = short.autoencoder.config["resolution"] // short.autoencoder.downsample_factor
    shape = (short.autoencoder.latent_channels, side, side)
    totals: dict[str, float] = {}
    for seed in args.seeds:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens])
        z = sample(args.sampler, model_fn, x, short.schedule, steps=args.steps, eta=0.0, prediction_type="flow",
                   generator=gens)
        for k, v in prompt_accuracy(short.decode_latents(z), prompts).items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(args.seeds)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("short", type=Path)
    ap.add_argument("long", type=Path)
    ap.add_argument("--splits", default="0.8,0.6,0.4,0.2", help="flow times a at which the models swap")
    ap.add_argument("--f2", default=str(ROOT / "exports" / "autoencoder"), help="the autoencoder both trained on")
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides both models were trained with")
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--interval", type=float, nargs=2, default=[0.3, 1.0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1000])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.data.shapes import prompt_set

    short, long = load(args.short, args.f2, args.override), load(args.long, args.f2, args.override)
    prompts = prompt_set(64, seed=0)
    n = 64 * len(args.seeds)
    print(f"shape accuracy over {n} images ({args.sampler} {args.steps}, guidance {args.guidance} in "
          f"{args.interval}); the long model alone is split 0, the short one alone split 1")
    print("| split a | long model above a | long model below a |\n|---|---|---|")
    for split in [float(v) for v in args.splits.split(",")]:
        above = swapped_accuracy(short, long, prompts, split, True, args)["shape"]
        below = swapped_accuracy(short, long, prompts, split, False, args)["shape"]
        print(f"| {split} | {above:.3f} | {below:.3f} |", flush=True)


if __name__ == "__main__":
    main()
