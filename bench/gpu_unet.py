"""Training-step throughput of our SD2-shaped UNet against diffusers' UNet2DConditionModel at the same config.

    python bench/gpu_unet.py --batch 32 --steps 20 --warmup 5 --which ours,diffusers --json out.json
    python bench/gpu_unet.py --device cpu --preset tiny --res 32 --batch 2 --steps 2     # smoke test, no GPU

One step = forward under autocast, MSE loss, backward, fused AdamW step (fp32 weights). Each variant (model x
eager/compiled) is built fresh and timed alone; images/s comes from the median timed step, FLOPs from one eager
forward+backward under FlopCounterMode, MFU = FLOPs per step / step time / --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

# diffusers' UNet config of stabilityai/stable-diffusion-2-1 (unet/config.json), less sample_size: the reference
# the preset mapping below must reproduce, so "same config" is checked rather than assumed. Its
# attention_head_dim is really the number of heads per level (diffusers issue #2011): 64-channel heads.
SD21_DIFFUSERS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
    "transformer_layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def import_ldm() -> Any:
    """`python bench/gpu_unet.py` puts bench/ on sys.path, not the repo root; the GPU machine has no install."""
    try:
        import ldm.diffusion.unet as unet_module
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import ldm.diffusion.unet as unet_module
    return unet_module


@functools.lru_cache
def ours_config(preset: str) -> dict[str, Any]:
    """Our UNetModel's full config for a preset (built on the meta device: no memory, no init time)."""
    with torch.device("meta"):
        return import_ldm().unet_preset(preset).config


def diffusers_config(cfg: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """Map our CompVis-style config to UNet2DConditionModel arguments, as diffusers' own converter does."""
    chans = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    has_attn = [2 ** i in cfg["attention_resolutions"] for i in range(len(chans))]
    heads = [c // cfg["num_head_channels"] if cfg["num_head_channels"] != -1 else cfg["num_heads"] for c in chans]
    return {
        "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"], "block_out_channels": chans,
        "layers_per_block": cfg["num_res_blocks"], "attention_head_dim": heads,
        "cross_attention_dim": cfg["context_dim"], "use_linear_projection": cfg["use_linear_in_transformer"],
        "transformer_layers_per_block": cfg["transformer_depth"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "sample_size": sample_size,
    }


def build(which: str, preset: str, latent: int, device: torch.device) -> tuple[nn.Module, Callable[..., Any]]:
    """A fresh model on `device` plus the call that maps (x, t, context) to its prediction."""
    if which == "ours":
        with device:
            model = import_ldm().unet_preset(preset)
        return model, lambda m, x, t, c: m(x, t, c)
    if which == "diffusers":
        from diffusers import UNet2DConditionModel

        config = diffusers_config(ours_config(preset), latent)
        if preset == "sd21":
            mismatch = {k: (config[k], v) for k, v in SD21_DIFFUSERS.items() if config[k] != v}
            if mismatch:
                raise ValueError(f"diffusers config differs from SD 2.1's: {mismatch}")
        with device:
            model = UNet2DConditionModel(**config)
        return model, lambda m, x, t, c: m(x, t, encoder_hidden_states=c, return_dict=False)[0]
    raise ValueError(f"--which: unknown model {which!r}; choose ours or diffusers")


def make_batch(args: argparse.Namespace, context_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One fixed synthetic batch: the benchmark times the model, not data loading."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    latent = args.res // args.latent_factor
    shape = (args.batch, 4, latent, latent)
    return {"x": torch.randn(shape, generator=g).to(device), "noise": torch.randn(shape, generator=g).to(device),
            "t": torch.randint(0, 1000, (args.batch,), generator=g).to(device),
            "context": torch.randn(args.batch, args.ctx_len, context_dim, generator=g).to(device)}


def forward_backward(model: nn.Module, call: Callable[..., Any], batch: dict[str, torch.Tensor],
                     amp: torch.dtype | None) -> torch.Tensor:
    autocast = torch.autocast(batch["x"].device.type, dtype=amp) if amp else contextlib.nullcontext()
    with autocast:
        pred = call(model, batch["x"], batch["t"], batch["context"])
    loss = F.mse_loss(pred.float(), batch["noise"])
    loss.backward()
    return loss.detach()


def count_flops(model: nn.Module, call: Callable[..., Any], batch: dict[str, torch.Tensor],
                amp: torch.dtype | None) -> int:
    """FLOPs of one eager forward+backward (the optimizer step is negligible and not a matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(model, call, batch, amp)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: the same columns hold SD-sized and tiny smoke-test numbers."""
    return float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so the next variant's peak memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(which: str, mode: str, args: argparse.Namespace, device: torch.device,
                flops: dict[str, int], amp: torch.dtype | None) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, call = build(which, args.preset, args.res // args.latent_factor, device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    context_dim = ours_config(args.preset)["context_dim"]
    batch = make_batch(args, context_dim, device)
    if which not in flops:
        flops[which] = count_flops(model, call, batch, amp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    runner = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], torch.zeros(())
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(runner, call, batch, amp)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:] or times
    step = statistics.median(timed)
    row = {
        "model": which, "mode": mode, "params_m": round(params / 1e6, 1),
        "step_ms": round(step * 1e3, 2), "step_ms_min": round(min(timed) * 1e3, 2),
        "images_per_s": sig(args.batch / step), "tflop_per_step": sig(flops[which] / 1e12),
        "tflops": sig(flops[which] / step / 1e12), "mfu_pct": sig(100 * flops[which] / step / (args.peak_tflops * 1e12)),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
        "first_step_s": round(times[0], 2), "final_loss": round(float(loss), 4), "status": "ok",
    }
    if not torch.isfinite(loss):
        row["status"] = "non-finite loss"
    del model, opt, runner, batch
    return row


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


COLUMNS = ["model", "mode", "params_m", "step_ms", "images_per_s", "vs_diffusers", "tflop_per_step", "tflops",
           "mfu_pct", "mfu_std_pct", "peak_mem_gib", "first_step_s", "status"]


def derive(rows: list[dict[str, Any]], flops: dict[str, int], peak_tflops: float) -> None:
    """Cross-row columns. Our UNet may do fewer FLOPs for the same function (e.g. a cheaper upsample conv), so
    mfu_std_pct puts every row on diffusers' (standard) FLOP count, and vs_diffusers compares images/s per mode."""
    speed = {r["mode"]: r["images_per_s"] for r in rows if r["model"] == "diffusers" and "images_per_s" in r}
    for row in rows:
        if "step_ms" not in row:
            continue
        if "diffusers" in flops:
            row["mfu_std_pct"] = sig(100 * flops["diffusers"] / (row["step_ms"] / 1e3) / (peak_tflops * 1e12))
        if row["mode"] in speed:
            row["vs_diffusers"] = sig(row["images_per_s"] / speed[row["mode"]], 3)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    latent = args.res // args.latent_factor
    lines = [f"### UNet training step: preset {args.preset}, {args.res} px (latents 4x{latent}x{latent}), "
             f"context {args.ctx_len}, batch {args.batch}, "
             f"{'fp32, no autocast' if args.dtype == 'float32' else args.dtype + ' autocast'}, fused AdamW",
             "", f"{env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env['diffusers']}; "
             f"median of {args.steps} steps after {args.warmup} warm-up; MFU against {args.peak_tflops:g} TFLOP/s "
             "(mfu_std_pct: on diffusers' FLOP count); vs_diffusers: images/s ratio in the same mode",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(c) is None else str(row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd21", help="ldm.diffusion.unet preset (tiny for a CPU smoke test)")
    parser.add_argument("--res", type=int, default=256, help="image size in pixels")
    parser.add_argument("--latent-factor", type=int, default=8, help="autoencoder downsampling (SD: 8)")
    parser.add_argument("--ctx-len", type=int, default=77, help="text tokens")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype; float32 = no autocast")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile variants (default: on for cuda, off for cpu)")
    parser.add_argument("--compile-modes", default="default",
                        help="comma list of torch.compile modes, e.g. default,max-autotune-no-cudagraphs")
    parser.add_argument("--which", default="ours,diffusers")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100 SXM bf16)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new variant after this many seconds (0: no limit); rows say skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here (a list of dicts), rewritten after every variant")
    parser.add_argument("--md", help="write the markdown table here too, rewritten after every variant")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    modes = ["eager"] + ([m.strip() for m in args.compile_modes.split(",") if m.strip()] if use_compile else [])
    whichs = [w.strip() for w in args.which.split(",") if w.strip()]
    env = environment(device)
    print(json.dumps(env), flush=True)
    common = {"preset": args.preset, "res": args.res, "batch": args.batch, "ctx_len": args.ctx_len,
              "dtype": args.dtype, **env}
    rows: list[dict[str, Any]] = []
    flops: dict[str, int] = {}
    start = time.perf_counter()
    for mode in modes:  # ours and diffusers alternate within each mode: drift in clocks hits both
        for which in whichs:
            elapsed = time.perf_counter() - start
            if args.budget_s and elapsed > args.budget_s:
                row = {"model": which, "mode": mode, "status": f"skipped: {elapsed:.0f} s > --budget-s"}
            else:
                print(f"[gpu_unet] {which} {mode} (t={elapsed:.0f} s)", flush=True)
                try:
                    row = run_variant(which, mode, args, device, flops, amp)
                except Exception as err:  # one failing variant (OOM, compile error) must not lose the others
                    traceback.print_exc()
                    row = {"model": which, "mode": mode, "status": f"error: {type(err).__name__}: {err}"[:200]}
                free(device)
            rows.append({**row, **common})
            derive(rows, flops, args.peak_tflops)
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            if args.md:
                Path(args.md).write_text(markdown(rows, args, env))
    print(markdown(rows, args, env), flush=True)
    return rows


if __name__ == "__main__":
    main()
