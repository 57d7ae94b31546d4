"""What post-hoc EMA costs: training step time with the power-function profiles on against off, and disk per snapshot.

    python bench/posthoc_ema_cost.py --presets tiny,small --repeats 20 --threads 2
    python bench/posthoc_ema_cost.py --device cuda --presets sd15 --dtype bfloat16 --json posthoc_cost.json

A step is forward, MSE, backward, AdamW and today's EMA update (what stage=ldm does every step); "on" adds the
update of two profiles (sigma_rel 0.05 and 0.10, model.posthoc_ema's example). Both run in one process on the
same model, alternating which goes first each repeat, after a warm-up; medians are reported and
ratio = on / off (1.05: profiles add 5% to a step); the profiles' update is also timed alone (update_ms,
ratio_from_update = (off + update) / off), which a busy machine disturbs less. The snapshot columns write both profiles the way training
does every snapshot_every steps (ldm.checkpoints.ema_snapshots): seconds per snapshot and MB on disk, per
profile file and per snapshot; amortised over snapshot_every steps the write is the last column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoints.ema_snapshots import snapshot_profiles  # noqa: E402
from ldm.diffusion.ema import EMA  # noqa: E402
from ldm.diffusion.posthoc_ema import PosthocEMA  # noqa: E402
from ldm.diffusion.unet import unet_preset  # noqa: E402

# preset -> (latent side, batch, context tokens)
SIZES = {"tiny": (16, 16, 16), "small": (32, 8, 77), "sd15": (64, 8, 77), "sd21": (64, 8, 77)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset: str, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
            snapshot_every: int) -> dict:
    side, batch, tokens = SIZES[preset]
    torch.manual_seed(0)
    unet = unet_preset(preset, in_channels=4, out_channels=4).to(device).train()
    ema = EMA(unet, decay=0.9999)
    posthoc = PosthocEMA({"unet": unet}, [0.05, 0.10])
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = torch.randn(batch, tokens, unet.config["context_dim"], generator=g).to(device)
    target = torch.randn(batch, 4, side, side, generator=g).to(device)

    def step(profiles: bool) -> float:
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(x, t, context)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        ema.update(unet)
        if profiles:
            posthoc.update({"unet": unet})
        sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        step(False), step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for profiles in ((False, True) if i % 2 == 0 else (True, False)):
            times[profiles].append(step(profiles))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    updates = []  # the profiles' update alone: steadier than a difference of two noisy step times
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        posthoc.update({"unet": unet})
        sync(device)
        updates.append(time.perf_counter() - start)
    update = statistics.median(updates)

    with tempfile.TemporaryDirectory() as tmp:
        writes = []
        for k in range(3):
            start = time.perf_counter()
            files = snapshot_profiles(tmp, posthoc, step=k + 1)
            writes.append(time.perf_counter() - start)
        sizes = [f.stat().st_size for f in files]
    params = sum(p.numel() for p in unet.parameters())
    snapshot_s = statistics.median(writes)
    return {"preset": preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "params_M": round(params / 1e6, 2), "step_off_ms": round(off * 1e3, 2), "step_on_ms": round(on * 1e3, 2),
            "ratio_on_off": round(on / off, 3), "ratio_of_min": round(min(times[True]) / min(times[False]), 3),
            "update_ms": round(update * 1e3, 2), "ratio_from_update": round((off + update) / off, 3),
            "profile_memory_MB": round(2 * params * 4 / 1e6, 1),
            "MB_per_profile_file": round(sizes[0] / 1e6, 2), "MB_per_snapshot": round(sum(sizes) / 1e6, 2),
            "snapshot_write_s": round(snapshot_s, 3),
            f"write_share_every_{snapshot_every}": round(snapshot_s / (snapshot_every * off), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--snapshot-every", type=int, default=500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(p, torch.device(args.device), getattr(torch, args.dtype), args.repeats, args.warmup,
                    args.snapshot_every) for p in args.presets.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
