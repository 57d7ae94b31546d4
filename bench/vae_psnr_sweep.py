"""Validation PSNR every 250 steps of the stage-1 recipe (L1 + KL + patch-GAN, no Lightning), per setting.

Sizes the built-in run: `python bench/vae_psnr_sweep.py --shards data/shapes` (quick on a GPU, slow on CPU);
`--only "3000 steps"` runs the settings that chose the built-in learning rate and schedule (about 6 minutes each
on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import tarfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.autoencoder.loss import VAELoss
from ldm.autoencoder.model import AutoencoderKL

BASE = dict(embed_dim=4, z_channels=4, resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_num_groups=4)
# (name, architecture overrides, training overrides)
SETTINGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("ch16", {}, {}), ("ch16 no GAN", {}, {"disc_start": 10**9}), ("ch32", {"ch": 32}, {}),
    ("ch32 no GAN", {"ch": 32}, {"disc_start": 10**9}), ("ch32 2 res blocks", {"ch": 32, "num_res_blocks": 2}, {}),
    ("ch64", {"ch": 64}, {}), ("ch16 mult [1,4]", {"ch_mult": [1, 4]}, {}), ("ch32 lr 1e-3", {"ch": 32}, {"lr": 1e-3}),
    ("ch32 lr 4e-3", {"ch": 32}, {"lr": 4e-3}), ("ch16 2000 steps", {}, {"steps": 2000, "disc_start": 1400}),
    # the built-in recipe's learning rate and schedule (no GAN: the built-in run ends where it would start)
    ("ch16 lr 2e-3 3000 steps", {}, {"lr": 2e-3, "steps": 3000, "disc_start": 10**9}),
    ("ch16 lr 3e-3 3000 steps", {}, {"lr": 3e-3, "steps": 3000, "disc_start": 10**9}),
    ("ch16 lr 4e-3 cosine 3000 steps", {}, {"lr": 4e-3, "cosine": True, "steps": 3000, "disc_start": 10**9}),
    ("ch16 lr 2e-3 last 30% linear decay 2500 steps", {}, {"lr": 2e-3, "decay": 0.3, "steps": 2500,
                                                          "disc_start": 10**9}),
]


def load(pattern: str, n: int) -> torch.Tensor:
    out = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".jpg", ".png")):
                    img = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    out.append(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
                    if len(out) >= n:
                        return torch.stack(out)
    return torch.stack(out)


def run(train: torch.Tensor, val: torch.Tensor, arch: dict[str, Any], steps: int = 1000, lr: float = 2e-3,
        disc_start: int = 700, batch: int = 16, decay: float = 0.0,
        cosine: bool = False, seed: int = 0) -> list[float]:
    dev = train.device
    torch.manual_seed(seed)
    model = AutoencoderKL(**{**BASE, **arch}).to(dev)
    loss = VAELoss(perceptual_weight=0.0, disc_start=disc_start, disc_ndf=32, disc_num_layers=2).to(dev)
    opt = torch.optim.AdamW([*model.parameters(), loss.logvar], lr=lr, betas=(0.9, 0.99), weight_decay=0)
    d_opt = torch.optim.AdamW(loss.discriminator.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0)

    def factor(s: int) -> float:
        """Linear warm-up over 50 steps; then constant, a cosine to 0, or linear to 0 over the last `decay`."""
        warm = min(1.0, (s + 1) / 51)
        if cosine:
            return warm * 0.5 * (1 + math.cos(math.pi * s / steps))
        return min(warm, (steps - s) / max(decay * steps, 1e-9))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator(device=dev).manual_seed(seed)
    psnr = []
    for step in range(steps):
        x = train[torch.randint(0, len(train), (batch,), generator=gen, device=dev)]
        post = model.encode(x)
        recon = model.decode(post.sample())
        g_loss, _ = loss.generator(x, recon, post, step, model.last_layer_weight())
        opt.zero_grad()
        g_loss.backward()
        opt.step()
        sched.step()
        if loss.disc_active(step):
            d_loss, _ = loss.discriminator_loss(x, recon.detach(), step)
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                rec = model.decode(model.encode(val).mode()).clamp(-1, 1)
            psnr.append(round(10 * torch.log10(4 / ((rec - val) ** 2).mean()).item(), 2))
    return psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="data/shapes")
    ap.add_argument("--num", type=int, default=20000, help="training images held in memory")
    ap.add_argument("--only", default="", help="run only the settings whose name contains this text")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as on the CPU
    train = load(f"{args.shards}/train/*.tar", args.num).to(dev)
    val = load(f"{args.shards}/val/*.tar", 256).to(dev)
    for name, arch, kw in [s for s in SETTINGS if args.only in s[0]]:
        start = time.time()
        print(json.dumps({"name": name, "psnr_every_250": run(train, val, arch, **kw),
                          "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
