"""Sampling seconds per image for each sampler, with classifier-free guidance, on a random UNet of a preset.

The network call dominates, so the ratio between samplers is mostly their step counts; this measures what the
samplers add on top and gives absolute numbers per machine.
`python bench/sampler_speed.py --sizes tiny --samplers ddim:50,dpmpp_2m:20,ddpm:50,euler:50,heun:10 --threads 2`
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS, classifier_free_guidance, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.unet import unet_preset

# preset -> (latent size, context tokens, context width)
SIZES = {"tiny": (16, 16, 64), "small": (32, 77, 512)}


def time_sampler(name: str, steps: int, size: str, batch: int, repeats: int, device: str,
                 dtype: torch.dtype) -> dict[str, object]:
    latent, tokens, width = SIZES[size]
    torch.manual_seed(0)
    unet = unet_preset(size, in_channels=4, out_channels=4, context_dim=width).to(device).eval()
    cond = torch.randn(batch, tokens, width, device=device)
    model_fn = classifier_free_guidance(unet, cond, torch.zeros_like(cond), 6.0)
    flow = name in FLOW_SAMPLERS
    schedule = FlowSchedule() if flow else NoiseSchedule()
    noise = torch.randn(batch, 4, latent, latent, device=device)
    times = []
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample(name, model_fn, noise, schedule, steps=steps, generator=torch.Generator(device).manual_seed(0),
                   prediction_type="flow" if flow else "epsilon")
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run warms up
                times.append(time.perf_counter() - start)
    per_image = statistics.median(times) / batch
    return {"size": size, "sampler": name, "steps": steps, "batch": batch, "s_per_image": round(per_image, 4),
            "ms_per_step_per_image": round(1000 * per_image / steps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny", help=f"comma-separated, from {sorted(SIZES)}")
    ap.add_argument("--samplers", default="ddim:50,dpmpp_2m:20,ddpm:50,euler:50,heun:10", help="name:steps,...")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        for spec in args.samplers.split(","):
            name, steps = spec.split(":")
            if name not in SAMPLERS:
                raise SystemExit(f"unknown sampler {name!r}; choose from {SAMPLERS}")
            row = time_sampler(name, int(steps), size, args.batch, args.repeats, args.device,
                               getattr(torch, args.dtype))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| size | sampler | steps | s / image | ms / step / image |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['sampler']} | {r['steps']} | {r['s_per_image']} | {r['ms_per_step_per_image']} |")
    if args.json:
        args.json.write_text(json.dumps({"results": rows}, indent=2))


if __name__ == "__main__":
    main()
