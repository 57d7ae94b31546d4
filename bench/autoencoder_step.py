"""Time one autoencoder training step, ours vs diffusers' AutoencoderKL, same architecture, weights and inputs.

    python bench/autoencoder_step.py --sizes tiny,small --repeats 20 --threads 2 [--device cuda]
        [--dtype bfloat16] [--json out.json]

A step is: encode, sample the posterior, decode, L1 + 1e-6 * KL, backward, AdamW. Both models run in one
process with weights copied through our converter; repeats alternate which model goes first, so drift in
machine load hits both alike. ratio = diffusers_ms / ours_ms of the medians (> 1: ours is faster); paired =
median over repeats of the two back-to-back steps' ratio, the steadier number on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm.autoencoder.model import AutoencoderKL
from ldm.checkpoints.autoencoder import compvis_to_diffusers, ddconfig_to_diffusers

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(arch=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32), batch=16),
    "small": dict(arch=dict(ch=64, ch_mult=[1, 2, 4], num_res_blocks=2, resolution=64), batch=8),
}


def build_pair(arch: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Our model with random weights and a diffusers model holding the same weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    ours = AutoencoderKL(**arch)
    with torch.no_grad():  # no zero layers: both models do real work in every branch
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    theirs = DiffusersAutoencoderKL(**ddconfig_to_diffusers(ours.config))
    theirs.load_state_dict(compvis_to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device, dtype).train(), theirs.to(device, dtype).train()


def ours_loss(model: AutoencoderKL, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    posterior = model.encode(x)
    recon = model.decode(posterior.sample(gen))
    return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()


def diffusers_loss(model: Any, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.sample(generator=gen)).sample
    return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()


def make_step(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, device: torch.device,
              seed: int) -> Callable[[], float]:
    """A closure running one full training step; returns the loss value (to compare the two models)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, gen)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def timed(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step()  # float() synchronizes
    return (time.perf_counter() - start) * 1e3, loss


def bench_size(name: str, repeats: int, warmup: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    spec = SIZES[name]
    ours, theirs = build_pair(spec["arch"], device, dtype)
    res = spec["arch"]["resolution"]
    x = (torch.rand(spec["batch"], 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device, dtype)
    steps = {"ours": make_step(ours, ours_loss, x, device, 2), "diffusers": make_step(theirs, diffusers_loss, x, device, 2)}
    first = {k: timed(s, device)[1] for k, s in steps.items()}  # same weights, noise and input: same loss
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for r in range(repeats):
        for key in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
            times[key].append(timed(steps[key], device)[0])
    ours_ms, theirs_ms = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    # each repeat's two steps ran back to back: the median of their ratios is robust to load that drifts
    paired = statistics.median(t / o for o, t in zip(times["ours"], times["diffusers"], strict=True))
    return dict(size=name, batch=spec["batch"], arch=spec["arch"], params=sum(p.numel() for p in ours.parameters()),
                ours_ms=ours_ms, diffusers_ms=theirs_ms, ratio=theirs_ms / ours_ms, paired_ratio=paired,
                first_loss_ours=first["ours"], first_loss_diffusers=first["diffusers"],
                ours_all_ms=times["ours"], diffusers_all_ms=times["diffusers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in SIZES]:
        parser.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    results = []
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"torch={torch.__version__}")
    print(f"{'size':<8}{'ours ms':>10}{'diffusers ms':>14}{'ratio':>8}{'paired':>8}   "
          "first-step loss ours / diffusers")
    for name in sizes:
        r = bench_size(name, args.repeats, args.warmup, device, dtype)
        results.append(r)
        print(f"{name:<8}{r['ours_ms']:>10.1f}{r['diffusers_ms']:>14.1f}{r['ratio']:>8.3f}{r['paired_ratio']:>8.3f}   "
              f"{r['first_loss_ours']:.6f} / {r['first_loss_diffusers']:.6f}", flush=True)
    if args.json:
        meta = dict(device=args.device, dtype=args.dtype, threads=torch.get_num_threads(), repeats=args.repeats,
                    warmup=args.warmup, torch=torch.__version__)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
