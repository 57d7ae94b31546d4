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

ShardDataModule(latents=True) yields {"moments": Bx2Cxhxw, "caption", "key"}, and
stage=ldm samples z from batch["moments"]. With `--text-encoder CONFIG [KEY=VALUE ...]`
each caption's frozen text-tower output is stored as well (ldm.data.text_embeddings),
and stage=ldm then runs neither encoder in its training step.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldm.data.decode import MOMENTS_EXT
from ldm.data.pipeline import ValStream
from ldm.data.shards import ShardSpec, expand_shards, is_local
from ldm.data.text_embeddings import CONTEXT_EXT, TextEmbedder, array_bytes, load_tower_config, weights_digest

INFO_NAME = "latents.json"


def autoencoder_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the autoencoder's weights: same weights, same digest."""
    return weights_digest(model)


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
    text_encoder: dict[str, Any] | None = None,
    caption_key: str | list[str] = "txt",
    caption_json_key: str | None = None,
    buckets: Any = None,
) -> dict[str, Any]:
    """Encode every sample of `shards` (centre crop at `resolution`) into latent shards under `out`.

    With `text_encoder` (a model.text_encoder config) every caption's frozen-tower output is stored too
    (ldm.data.text_embeddings). Several captions per sample (a list of caption keys, or caption_json_key) are
    all kept: the first as {key}.txt, all in {key}.json under "captions". `buckets` (a data.buckets value)
    crops each image to its aspect bucket instead, so its moments keep the bucket's shape; latents.json
    records the buckets and the latent factor, and training on the shards groups batches by that shape.
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
    embedder = TextEmbedder(text_encoder, device=device, batch_size=batch_size) if text_encoder else None
    if embedder is not None:
        info.update(embedder.info())
        embedder.write_empty(out)
    stream = ValStream(expand_shards(shards), resolution=resolution, batch_size=batch_size,
                       caption_key=caption_key, caption_json_key=caption_json_key, buckets=bucket_list)
    if stream.options.several_captions:
        info["caption_json_key"] = "captions"
    bar = tqdm(unit="img", desc="encoding", disable=not progress)
    shard_index, in_shard, total, tar = 0, 0, 0, None

    def close() -> None:
        if tar is not None:
            tar.close()
            (out / f"{shard_index:05d}_stats.json").write_text(json.dumps({"successes": in_shard}) + "\n")

    for batch in stream:
        moments = model.quant_conv(model.encoder(batch["image"].to(device))).half().cpu().numpy()
        captions = batch.get("captions") or [[c] for c in batch["caption"]]
        contexts = embedder.per_sample(captions) if embedder is not None else [None] * len(captions)
        for key, caption, sample, several, context in zip(batch["key"], batch["caption"], moments, captions,
                                                          contexts, strict=True):
            if tar is None or in_shard == shard_size:
                close()
                shard_index, in_shard = (shard_index + 1 if tar is not None else 0), 0
                tar = tarfile.open(out / f"{shard_index:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
            _member(tar, f"{key}.{MOMENTS_EXT}", array_bytes(sample))
            _member(tar, f"{key}.txt", caption.encode("utf-8"))
            if "captions" in batch:
                _member(tar, f"{key}.json", json.dumps({"captions": several}).encode("utf-8"))
            if context is not None:
                _member(tar, f"{key}.{CONTEXT_EXT}", array_bytes(context))
            in_shard += 1
            total += 1
        bar.update(len(batch["key"]))
    close()
    bar.close()
    info["num_samples"] = total
    info["latent_shape"] = list(moments.shape[1:]) if total else None
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def latents_folder(urls: list[str]) -> Path:
    """The folder of local latent shards (the first shard's), where latents.json lies."""
    if not urls or not is_local(urls[0]):
        raise ValueError("latent shards must be local to check which autoencoder made them")
    return Path(urls[0].removeprefix("file:")).resolve().parent


def latents_info(urls: list[str]) -> dict[str, Any]:
    """latents.json of local latent shards (beside the first shard)."""
    path = latents_folder(urls) / INFO_NAME
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
    parser.add_argument("--text-encoder", nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                        help="also store the frozen text tower's output per caption: the training run's "
                             "model.text_encoder, as a name in conf/model/text_encoder (tiny, openclip_vit_h14) or a "
                             "YAML file, then key=value overrides (e.g. tiny width=32)")
    parser.add_argument("--caption-key", nargs="+", default=["txt"],
                        help="tar member extension(s) holding captions; several: each one a caption")
    parser.add_argument("--caption-json-key", default=None,
                        help="also read captions from this key of each sample's .json (a list of strings)")
    parser.add_argument("--buckets", type=json.loads, default=None,
                        help='aspect buckets as JSON, like data.buckets: \'[[192, 320], [256, 256]]\' or '
                             '\'{"step": 64, "max_ratio": 2.0}\'; each latent keeps its bucket\'s shape')
    args = parser.parse_args(argv)
    tower = load_tower_config(args.text_encoder[0], args.text_encoder[1:]) if args.text_encoder else None
    caption_key = args.caption_key[0] if len(args.caption_key) == 1 else args.caption_key
    info = encode_shards(args.autoencoder, args.shards, args.out, resolution=args.resolution,
                         batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                         text_encoder=tower, caption_key=caption_key, caption_json_key=args.caption_json_key,
                         buckets=args.buckets)
    text = (f", text tower sha256 {info['text_encoder_sha256'][:12]}..." if tower else "")
    print(f"wrote {info['num_samples']} latents {info['latent_shape']} to {args.out} "
          f"(autoencoder sha256 {info['autoencoder_sha256'][:12]}...{text})")
    return info


if __name__ == "__main__":
    main()
