"""Does an autoencoder overflow in float16? Largest activation per layer against fp16's limit, and an fp16 run.

SD-style VAEs are known to produce activations beyond fp16's 65504 in the decoder; this measures ours (or any
file `AutoencoderKL.from_pretrained` reads) on real images, so `fp16_upcast` can be justified with numbers.

    python bench/fp16_overflow.py --autoencoder exports/autoencoder --shards 'data/shapes/val/*.tar'
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import tarfile

import numpy as np
import torch
from PIL import Image

from ldm.autoencoder.model import AutoencoderKL

FP16_MAX = 65504.0


def load_images(pattern: str, n: int, size: int) -> torch.Tensor:
    out = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((size, size))
                    out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
                    if len(out) == n:
                        return torch.stack(out)
    if not out:
        raise SystemExit(f"no images found in {pattern}")
    return torch.stack(out)


def activation_peaks(model: AutoencoderKL, x: torch.Tensor) -> dict[str, float]:
    peaks: dict[str, float] = {}

    def hook(name: str):  # noqa: ANN202 - forward hook factory
        def record(_module, _inputs, output) -> None:  # noqa: ANN001
            if isinstance(output, torch.Tensor):
                peaks[name] = max(peaks.get(name, 0.0), float(output.detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model.decode(model.encode(x).mode())
    for h in handles:
        h.remove()
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autoencoder", default="exports/autoencoder", help="export dir, SD/diffusers file or 'random-sd'")
    ap.add_argument("--shards", default="data/shapes/val/*.tar")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.autoencoder == "random-sd":
        model = AutoencoderKL(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, resolution=args.size)
    else:
        model = AutoencoderKL.from_pretrained(args.autoencoder)
    model = model.to(args.device).eval()
    x = load_images(args.shards, args.num, args.size).to(args.device)
    peaks = activation_peaks(model, x)
    top = sorted(peaks.items(), key=lambda kv: -kv[1])[:5]
    with torch.no_grad():
        ref = model.decode(model.encode(x).mode())
        with torch.autocast(x.device.type, dtype=torch.float16):
            half = model.decode(model.encode(x).mode()).float()
    result = {"autoencoder": args.autoencoder, "device": args.device, "max_activation": top[0][1],
              "headroom_vs_fp16": FP16_MAX / top[0][1], "top_layers": top,
              "fp16_output_finite": bool(torch.isfinite(half).all()),
              "fp16_max_abs_diff": float((half - ref).abs().max()) if torch.isfinite(half).all() else None}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
