"""What torch.compile costs with aspect buckets: compile seconds per bucket shape, and graphs made.

    python bench/bucket_compile.py --backend inductor --buckets "[[64,96],[64,64],[96,64]]"

A tiny UNet's training step on the CPU, compiled as `perf.compile=true` does it with data.buckets set
(ldm.train.perf.compile_per_shape: one static graph per shape, an error instead of a silent fall back to
eager). Each bucket's first step pays its compilation; later steps on a seen shape must not recompile.
The same steps run eager in the same process on the same inputs, for the steady-state ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.diffusion.unet import UNetModel  # noqa: E402
from ldm.train.perf import compile_per_shape  # noqa: E402


def _unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2],
                     channel_mult=[1, 2], num_head_channels=16, context_dim=32).train()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: tuple[torch.Tensor, ...]) -> float:
    x, t, context, target = inputs
    start = time.perf_counter()
    loss = F.mse_loss(model(x, t, context), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=json.loads, default=[[64, 96], [64, 64], [96, 64]],
                        help="pixel buckets (latents are 1/8 of them: an f8 autoencoder)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steady-state steps per bucket, each side")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    compile_per_shape(len(args.buckets))
    eager, compiled = _unet(), _unet()
    compiled.compile(backend=args.backend)
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (eager, compiled)}
    gen = torch.Generator().manual_seed(0)

    def inputs(h: int, w: int) -> tuple[torch.Tensor, ...]:
        x = torch.randn(args.batch, 4, h // 8, w // 8, generator=gen)
        return (x, torch.randint(0, 1000, (args.batch,), generator=gen),
                torch.randn(args.batch, 7, 32, generator=gen), torch.randn(x.shape, generator=gen))

    counters.clear()
    rows = []
    for h, w in args.buckets:  # the first step on each shape compiles it
        first = inputs(h, w)
        compile_s = _step(compiled, opts[id(compiled)], first) - _step(eager, opts[id(eager)], first)
        rows.append({"bucket": f"{h}x{w}", "compile_s": round(compile_s, 2)})
    graphs_after_first = counters["stats"]["unique_graphs"]
    steady = {"eager": [], "compiled": []}
    for _ in range(args.steps):  # every shape again: a recompile here would show as more graphs
        for h, w in args.buckets:
            batch = inputs(h, w)
            steady["eager"].append(_step(eager, opts[id(eager)], batch))
            steady["compiled"].append(_step(compiled, opts[id(compiled)], batch))
    result = {
        "backend": args.backend, "buckets": rows,
        "unique_graphs": counters["stats"]["unique_graphs"], "graphs_after_first_pass": graphs_after_first,
        "graph_breaks": dict(counters["graph_break"]),
        "eager_step_s": round(statistics.median(steady["eager"]), 4),
        "compiled_step_s": round(statistics.median(steady["compiled"]), 4),
    }
    result["compiled_over_eager"] = round(result["compiled_step_s"] / result["eager_step_s"], 3)
    print(json.dumps(result, indent=1))
    ok = result["unique_graphs"] == graphs_after_first == len(args.buckets) and not result["graph_breaks"]
    print("one graph per bucket shape, no recompiles on seen shapes" if ok else "NOT one graph per shape: see above")
    return result


if __name__ == "__main__":
    main()
