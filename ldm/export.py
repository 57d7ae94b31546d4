"""Export a stage=ldm checkpoint for other tools: `python -m ldm.export --ckpt PATH --out DIR`.

Writes our bundle (unet.json + unet_ema.safetensors + autoencoder/), which `python sample.py ckpt=DIR` loads,
a diffusers StableDiffusionPipeline folder (DIR/diffusers: unet, vae, text_encoder, tokenizer, scheduler), a
Stable Diffusion single file (DIR/sd.safetensors, for ComfyUI and AUTOMATIC1111) and the EMA UNet and the
autoencoder with CompVis key names (DIR/compvis/unet.safetensors, vae.safetensors). train.py
stage=ldm writes the same folder into its run directory at the end of training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.train.checks import ConfigError


def export_checkpoint(ckpt: str | Path, out: str | Path, runs: str = "runs") -> list[Path]:
    """Load a checkpoint (a .ckpt, a bundle folder, a run folder or "latest") and write every layout to `out`."""
    # reason: start-up time of `python -m ldm.export`: --help and argument errors come before Lightning loads
    from ldm.bundle import load_ldm, write_bundle
    from ldm.sampling import resolve_checkpoint

    path = resolve_checkpoint(str(ckpt), runs)
    try:
        module = load_ldm(path)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"--ckpt {path}: cannot load a stage=ldm model: {err}") from err
    out = Path(out)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--out {out} is the bundle being read; choose another folder")
    write_bundle(module, out)
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="latest",
                        help="a stage=ldm .ckpt, an export folder, a run folder, or 'latest' (default)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--runs", default="runs", help="where 'latest' looks (paths.runs)")
    args = parser.parse_args(argv)
    try:
        files = export_checkpoint(args.ckpt, args.out, args.runs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = Path(args.out)
    for f in files:
        print(f"  {f.relative_to(root)}  ({f.stat().st_size / 1e6:.1f} MB)")
    print(f"[ldm] exported to {root}; sample with: python sample.py ckpt={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
