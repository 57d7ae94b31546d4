"""Precomputed latents: encode image shards once with a trained autoencoder, then stream the latents.

    python -m ldm.data.latents --autoencoder exports/autoencoder --shards 'data/mine/train' \
        --out data/mine-latents/train --resolution 256 --device cuda

Each sample becomes `{key}.moments.npy` (the posterior's mean and log-variance,
2C x h x w, float16) beside its `{key}.txt`. Storing the moments rather than one
latent sample keeps the posterior noise fresh at every step, as on-the-fly
encoding does. The `.npy` bytes are written and read by numpy with
`allow_pickle=False`, so a latent shard cannot carry code. `latents.json` in the
output folder names the autoencoder by a SHA-256 over its weights;
`check_latents` refuses shards made by another one.

The data side is complete (ShardDataModule(latents=True) yields
{"moments": Bx2Cxhxw, "caption", "key"}); stage=ldm still encodes images itself
until its module learns to sample z from batch["moments"].
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldm.data.decode import MOMENTS_EXT
from ldm.data.pipeline import ValStream
from ldm.data.shards import ShardSpec, expand_shards, is_local

INFO_NAME = "latents.json"


def autoencoder_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the autoencoder's weights (names, shapes, float32 values): same weights, same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def moments_to_bytes(moments: np.ndarray) -> bytes:
    """An .npy file with no pickle in it."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(moments), allow_pickle=False)
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@torch.no_grad()
def encode_shards(
    autoencoder: str | Path,
    shards: ShardSpec,
    out: str | Path,
    *,
    resolution: int,
    batch_size: int = 32,
    shard_size: int = 10000,
    device: str = "cpu",
    progress: bool = True,
    buckets: Any = None,
) -> dict[str, Any]:
    """Encode every sample of `shards` (centre crop at `resolution`) into latent shards under `out`.

    `buckets` (a data.buckets value) crops each image to its aspect bucket instead, so its
    moments keep the bucket's shape; latents.json records the buckets and the latent factor,
    and training on the shards groups batches by that shape.
    """
    from ldm.autoencoder.model import AutoencoderKL
    from ldm.data.buckets import check_bucket_factor, parse_buckets

    model = AutoencoderKL.from_pretrained(autoencoder).to(device).eval()
    bucket_list = parse_buckets(buckets, resolution)
    factor = int(model.downsample_factor)
    check_bucket_factor(bucket_list, factor, f"the autoencoder's factor {factor}")
    info = {"autoencoder": str(autoencoder), "autoencoder_sha256": autoencoder_digest(model),
            "resolution": resolution, "dtype": "float16", "member": MOMENTS_EXT}
    if bucket_list is not None:
        info.update(buckets=[list(b) for b in bucket_list], latent_factor=factor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; choose an empty directory")
    stream = ValStream(expand_shards(shards), resolution=resolution, batch_size=batch_size, buckets=bucket_list)
    bar = tqdm(unit="img", desc="encoding", disable=not progress)
    shard_index, in_shard, total, tar = 0, 0, 0, None

    def close() -> None:
        if tar is not None:
            tar.close()
            (out / f"{shard_index:05d}_stats.json").write_text(json.dumps({"successes": in_shard}) + "\n")

    for batch in stream:
        moments = model.quant_conv(model.encoder(batch["image"].to(device))).half().cpu().numpy()
        for key, caption, sample in zip(batch["key"], batch["caption"], moments, strict=True):
            if tar is None or in_shard == shard_size:
                close()
                shard_index, in_shard = (shard_index + 1 if tar is not None else 0), 0
                tar = tarfile.open(out / f"{shard_index:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
            _member(tar, f"{key}.{MOMENTS_EXT}", moments_to_bytes(sample))
            _member(tar, f"{key}.txt", caption.encode("utf-8"))
            in_shard += 1
            total += 1
        bar.update(len(batch["key"]))
    close()
    bar.close()
    info["num_samples"] = total
    info["latent_shape"] = list(moments.shape[1:]) if total else None
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def latents_info(urls: list[str]) -> dict[str, Any]:
    """latents.json of local latent shards (beside the first shard)."""
    if not urls or not is_local(urls[0]):
        raise ValueError("latent shards must be local to check which autoencoder made them")
    path = Path(urls[0].removeprefix("file:")).resolve().parent / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: these are not latent shards written by ldm.data.latents")
    return json.loads(path.read_text())


def check_latents(urls: list[str], autoencoder: str | Path | None) -> dict[str, Any]:
    """Refuse latent shards made by another autoencoder than `autoencoder` (when given)."""
    info = latents_info(urls)
    if autoencoder is not None:
        from ldm.autoencoder.model import AutoencoderKL

        digest = autoencoder_digest(AutoencoderKL.from_pretrained(autoencoder))
        if digest != info["autoencoder_sha256"]:
            raise ValueError(
                f"latent shards were made by autoencoder {info['autoencoder']} (sha256 "
                f"{info['autoencoder_sha256'][:12]}...), not by {autoencoder} ({digest[:12]}...): "
                "re-encode them with python -m ldm.data.latents"
            )
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Encode image shards into latent shards (moments, no pickle).")
    parser.add_argument("--autoencoder", required=True, help="our export folder, a diffusers folder or a CompVis file")
    parser.add_argument("--shards", required=True, help="image shards: folder, brace pattern or URL")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--buckets", type=json.loads, default=None,
                        help='aspect buckets as JSON, like data.buckets: \'[[192, 320], [256, 256]]\' or '
                             '\'{"step": 64, "max_ratio": 2.0}\'; each latent keeps its bucket\'s shape')
    args = parser.parse_args(argv)
    info = encode_shards(args.autoencoder, args.shards, args.out, resolution=args.resolution,
                         batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                         buckets=args.buckets)
    print(f"wrote {info['num_samples']} latents {info['latent_shape']} to {args.out} "
          f"(autoencoder sha256 {info['autoencoder_sha256'][:12]}...)")
    return info


if __name__ == "__main__":
    main()
