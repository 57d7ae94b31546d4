"""Does torch.compile capture a UNet preset's training step whole? Graph breaks, graphs and recompiles.

    python bench/compile_check.py --preset sd21 --backend aot_eager     # the SD 2.1 UNet, on a CPU, in a minute

aot_eager runs dynamo and AOTAutograd (the joint forward/backward graph) without inductor's code generation,
so it shows on any machine what inductor would be handed. Inputs are fresh random tensors every step, the
shapes stay fixed, as in training: more than one graph means a graph break or a guard that fails per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.diffusion.unet import unet_preset  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd21")
    parser.add_argument("--backend", default="aot_eager", help="aot_eager (capture only) or inductor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype; float32 = no autocast")
    parser.add_argument("--latent", type=int, default=8, help="latent side (8: 64 px images at factor 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = unet_preset(args.preset).train()
    model.compile(backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    channels, context_dim = model.config["in_channels"], model.config["context_dim"]
    amp = (torch.autocast(device.type, dtype=getattr(torch, args.dtype)) if args.dtype != "float32"
           else contextlib.nullcontext())
    counters.clear()
    start, step_s = time.perf_counter(), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x = torch.randn(args.batch, channels, args.latent, args.latent, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        context = torch.randn(args.batch, args.tokens, context_dim, device=device)
        with amp:
            out = model(x, t, context)
        loss = F.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(round(time.perf_counter() - t0, 2))
    result = {"preset": args.preset, "backend": args.backend, "dtype": args.dtype, "steps": args.steps,
              "graph_breaks": dict(counters["graph_break"]),
              "unique_graphs": counters["stats"]["unique_graphs"],
              "step_seconds": step_s, "total_s": round(time.perf_counter() - start, 1),
              "final_loss_finite": bool(torch.isfinite(loss))}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    # A recompile (a guard failing on a later step) or a graph break both show as more than one graph.
    ok = not result["graph_breaks"] and result["unique_graphs"] == 1
    print("one graph, no breaks, no recompiles" if ok else "NOT captured whole: see above")
    return result


if __name__ == "__main__":
    main()
