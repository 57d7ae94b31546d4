"""stage=ldm training step from precomputed latents (data=latents) against encoding images on the fly.

Both sides are the same LatentDiffusionModule, weights and batch; the latent side receives the moments the
autoencoder would produce, so the difference is the encoder's forward pass. Interleaved repeats, medians.
`python bench/latent_speedup.py --autoencoders tiny,kl_f8 --threads 2`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# autoencoder preset -> image side used for the step
SIDES = {"tiny": 32, "kl_f4": 64, "kl_f8": 128, "sd": 256}


def preset(group: str, name: str, **overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / group / f"{name}.yaml"), resolve=False)
    cfg = {k: v for k, v in cfg.items() if k != "init_from"}
    cfg.update(overrides)
    return cfg


def measure(name: str, batch: int, repeats: int) -> dict:
    from ldm.diffusion.module import LatentDiffusionModule

    side = SIDES[name]
    torch.manual_seed(0)
    module = LatentDiffusionModule(unet=preset("unet", "tiny"), text_encoder=preset("text_encoder", "tiny"),
                                   autoencoder=preset("autoencoder", name, resolution=side), scale_factor=1.0,
                                   metrics=None)
    module.log = lambda *a, **k: None
    module.train()
    images = torch.rand(batch, 3, side, side) * 2 - 1
    with torch.no_grad():
        moments = module.autoencoder.quant_conv(module.autoencoder.encoder(images)).half()
    captions = ["a red circle on a blue background"] * batch
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-5)
    batches = {"images": {"image": images, "caption": captions}, "latents": {"moments": moments, "caption": captions}}

    def step(b: dict) -> float:
        start = time.perf_counter()
        loss = module.training_step(b, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in batches}
    for key in batches:
        step(batches[key])  # warm-up
    for i in range(repeats):
        order = list(batches) if i % 2 == 0 else list(reversed(batches))
        for key in order:
            times[key].append(step(batches[key]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"autoencoder": name, "side": side, "batch": batch, "ms_images": round(1000 * med["images"], 1),
            "ms_latents": round(1000 * med["latents"], 1), "speedup": round(med["images"] / med["latents"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autoencoders", default="tiny,kl_f8", help=f"comma-separated, from {sorted(SIDES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, args.batch, args.repeats) for name in args.autoencoders.split(",")]
    print("| autoencoder | image px | batch | step from images (ms) | step from latents (ms) | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['autoencoder']} | {r['side']} | {r['batch']} | {r['ms_images']} | {r['ms_latents']} | "
              f"{r['speedup']}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
