"""One UNet training step, ours vs diffusers' UNet2DConditionModel: same architecture, weights and inputs.

    python bench/unet_step.py --sizes tiny,small --repeats 10 --threads 2
    python bench/unet_step.py --device cuda --dtype bfloat16 --compile --json unet_step.json

A step is forward, MSE to a random target, backward and an AdamW step. Both models run in one
process, alternating which goes first each repeat, after a warm-up; the median is reported.
Ratio = diffusers ms / ours ms, so > 1 means ours is faster; "(of min)" is the same ratio of the fastest
repeats, steadier when other processes share the CPU. max|diff| is the largest output difference of the
two models on the batch (same weights): the comparison is of one function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoints.unet import compvis_to_diffusers, diffusers_config  # noqa: E402
from ldm.diffusion.unet import unet_preset  # noqa: E402

# size -> (preset, latent side, batch, context tokens)
SIZES = {"tiny": ("tiny", 16, 16, 16), "small": ("small", 32, 8, 77)}


def build_pair(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0
               ) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """Our preset UNet, a diffusers UNet with the same weights, and one batch of inputs."""
    from diffusers import UNet2DConditionModel

    preset, side, batch, tokens = SIZES[size]
    torch.manual_seed(seed)
    ours = unet_preset(preset, in_channels=4, out_channels=4)
    with torch.no_grad():
        for p in ours.parameters():  # the zero-initialised output layers would make the step degenerate
            p.normal_(0, 0.05)
    theirs = UNet2DConditionModel.from_config(diffusers_config(ours.config, sample_size=side))
    missing, unexpected = theirs.load_state_dict(compvis_to_diffusers(ours.state_dict(), ours.config), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight conversion failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ours, theirs = ours.to(device, dtype).train(), theirs.to(device).train()
    if dtype != torch.float32:  # diffusers logs a warning on every dtype cast
        theirs = theirs.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"x": torch.randn(batch, 4, side, side, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g),
              "context": torch.randn(batch, tokens, ours.config["context_dim"], generator=g),
              "target": torch.randn(batch, 4, side, side, generator=g)}
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    return ours, theirs, inputs


def make_step(model: torch.nn.Module, forward: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
              compile_model: bool) -> Callable[[], float]:
    """A closure running one optimisation step; returns the loss so the work cannot be skipped."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as ldm.train.optim uses it
    fwd = torch.compile(forward) if compile_model else forward

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = fwd(inputs["x"], inputs["t"], inputs["context"])
        loss = F.mse_loss(out.float(), inputs["target"].float())
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def max_output_diff(ours: torch.nn.Module, theirs: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        a = ours(inputs["x"], inputs["t"], inputs["context"])
        b = theirs(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], return_dict=False)[0]
    return float((a.float() - b.float()).abs().max())


def bench_size(size: str, args: argparse.Namespace) -> dict[str, object]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ours, theirs, inputs = build_pair(size, device, dtype)
    diff = max_output_diff(ours, theirs, inputs)
    steps = {
        "ours": make_step(ours, lambda x, t, c: ours(x, t, c), inputs, args.compile),
        "diffusers": make_step(theirs, lambda x, t, c: theirs(x, t, encoder_hidden_states=c, return_dict=False)[0],
                               inputs, args.compile),
    }

    def timed(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = steps[name]()
        float(loss)  # waits for the device
        return (time.perf_counter() - start) * 1000

    for _ in range(args.warmup):
        for name in steps:
            timed(name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(name))
    ours_ms, theirs_ms = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    preset, side, batch, tokens = SIZES[size]
    return {"size": size, "preset": preset, "latent": [4, side, side], "batch": batch, "tokens": tokens,
            "params_m": sum(p.numel() for p in ours.parameters()) / 1e6, "ours_ms": ours_ms,
            "diffusers_ms": theirs_ms, "ratio": theirs_ms / ours_ms,
            "ratio_of_min": min(times["diffusers"]) / min(times["ours"]), "max_abs_output_diff": diff,
            "ours_all_ms": times["ours"], "diffusers_all_ms": times["diffusers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both forwards")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown --sizes {unknown}; choose from {sorted(SIZES)}")
    rows = []
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} compile={args.compile} "
          f"repeats={args.repeats} torch={torch.__version__}")
    print(f"{'size':<6} {'params':>8} {'ours ms':>10} {'diffusers ms':>13} {'ratio':>7} {'(of min)':>8} "
          f"{'max|diff|':>10}")
    for size in sizes:
        row = bench_size(size, args)
        rows.append(row)
        print(f"{size:<6} {row['params_m']:>7.2f}M {row['ours_ms']:>10.1f} {row['diffusers_ms']:>13.1f} "
              f"{row['ratio']:>6.2f}x {row['ratio_of_min']:>7.2f}x {row['max_abs_output_diff']:>10.2e}", flush=True)
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "compile": args.compile, "repeats": args.repeats, "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
