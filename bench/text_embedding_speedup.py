"""stage=ldm training step with text embeddings stored with the latents against encoding the captions in the step.

One LatentDiffusionModule with the SD 2 text tower's shape (OpenCLIP ViT-H-14 text: width 1024, 24 layers,
16 heads, context 77, penultimate layer; random weights, no download) and a small UNet (the tiny preset,
context_dim 1024 from the tower). Both sides get the same moments (so neither runs the autoencoder) and the same
captions; the stored side gets those captions' float16 contexts from the same tower, as
`python -m ldm.data.latents --text-encoder` writes them, so the difference is the tower's forward pass.
Interleaved repeats, medians, one process.
`python bench/text_embedding_speedup.py --batch 8 --threads 2`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# OpenCLIP ViT-H-14's text tower (SD 2), built from random weights
SD2_TEXT = {"kind": "openclip", "model_name": None, "pretrained": None, "layer": "penultimate", "width": 1024,
            "heads": 16, "layers": 24, "context_length": 77, "freeze": True}


def measure(batch: int, repeats: int, unet_channels: int) -> dict:
    from bench.latent_speedup import preset
    from ldm.diffusion.module import LatentDiffusionModule

    torch.manual_seed(0)
    unet = preset("unet", "tiny", model_channels=unet_channels)
    module = LatentDiffusionModule(unet=unet, text_encoder=SD2_TEXT, autoencoder=preset("autoencoder", "tiny",
                                   resolution=32), scale_factor=1.0, metrics=None)
    module.log = lambda *a, **k: None
    module.train()
    with torch.no_grad():
        moments = module.autoencoder.quant_conv(module.autoencoder.encoder(torch.rand(batch, 3, 32, 32) * 2 - 1))
        captions = [f"a photo of a red circle on a blue background, number {i}" for i in range(batch)]
        context = module.text_encoder(captions).half()  # what the latent shards store
        module.use_stored_text(module.text_encoder([""])[0].half())
    encoded = {"moments": moments.half(), "caption": captions}
    batches = {"encoded": encoded, "stored": {**encoded, "context": context}}
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-5)

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
        for key in list(batches) if i % 2 == 0 else list(reversed(batches)):
            times[key].append(step(batches[key]))
    med = {k: statistics.median(v) for k, v in times.items()}
    unet_params = sum(p.numel() for p in module.unet.parameters())
    return {"batch": batch, "unet_model_channels": unet_channels, "unet_params_m": round(unet_params / 1e6, 2),
            "latent": [moments.shape[1] // 2, *moments.shape[2:]], "ms_encoded": round(1000 * med["encoded"], 1),
            "ms_stored": round(1000 * med["stored"], 1), "speedup": round(med["encoded"] / med["stored"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unet-channels", type=int, default=32, help="model_channels of the tiny UNet preset")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the row here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row = measure(args.batch, args.repeats, args.unet_channels)
    print("| batch | UNet (tiny preset) | latents | step, text encoded (ms) | step, stored embeddings (ms) | speedup |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['batch']} | model_channels {row['unet_model_channels']}, {row['unet_params_m']} M params | "
          f"{'x'.join(map(str, row['latent']))} | {row['ms_encoded']} | {row['ms_stored']} | {row['speedup']}x |")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
