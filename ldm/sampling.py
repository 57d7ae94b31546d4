"""sample.py's work: checkpoint -> prompts -> PNGs, a grid and manifest.jsonl.

Everything a user can get wrong (sampler, sizes, seeds, device, prompt files, the checkpoint path) is
checked before the model is loaded, so a typo costs a second, not a multi-GB load.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.diffusion.samplers import SAMPLERS
from ldm.train.checks import ConfigError
from ldm.train.images import make_grid, to_uint8
from ldm.train.run_dir import find_latest_checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(ckpt: str | None, runs: str) -> Path:
    """ckpt=latest (or empty): the newest stage=ldm checkpoint under `runs`; else a .ckpt file, an export
    bundle folder, or a run folder (its export/ bundle, else its newest checkpoint)."""
    from ldm.checkpoints.bundle import is_bundle

    if ckpt in (None, "", "latest"):
        found = find_latest_checkpoint(runs, "ldm")
        if found is None:
            raise ConfigError(f"ckpt=latest: no stage=ldm checkpoint under {runs}/ldm; train one "
                              f"(python train.py stage=ldm) or pass ckpt=PATH (a .ckpt or an export folder)")
        return found
    path = Path(str(ckpt))
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt}: no such file or folder")
    if path.is_dir():
        if is_bundle(path):
            return path
        if is_bundle(path / "export"):
            return path / "export"
        found = sorted(path.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            last = path / "checkpoints" / "last.ckpt"
            return last if last.exists() else found[-1]
        raise ConfigError(f"ckpt={ckpt}: a folder, but neither an export bundle (unet.json + unet_ema.safetensors) "
                          f"nor a run folder with checkpoints/*.ckpt")
    return path


def read_prompts(prompt: str | None, prompts_file: str | None, shapes_prompts: int, seed: int) -> list[str]:
    """One prompt, a file of prompts (one per line, blank lines skipped), or the built-in shapes vocabulary."""
    if prompt and prompts_file:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    if prompt:
        return [str(prompt)]
    if prompts_file:
        path = Path(str(prompts_file))
        if not path.is_file():
            raise ConfigError(f"prompts_file={prompts_file}: no such file")
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file={prompts_file} holds no prompts")
        return prompts
    from ldm.data.shapes import prompt_set

    return prompt_set(int(shapes_prompts), seed=seed)


def resolve_device(device: str) -> torch.device:
    """auto: cuda when there is one, else cpu. Asking for cuda without one is an error, not a silent cpu run."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device={device!r}: choose auto, cpu or cuda[:N] ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine; use device=cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: choose auto, cpu or cuda[:N]")
    return dev


def image_seeds(num_prompts: int, num_images: int, seed: int, seeds: list[int] | None) -> list[list[int]]:
    """Seeds per prompt: an explicit list is used for every prompt; else image k of prompt i gets
    seed + i * num_images + k, so every image of a run has its own seed and can be remade alone."""
    if seeds is not None:
        return [[int(s) for s in seeds] for _ in range(num_prompts)]
    return [[seed + i * num_images + k for k in range(num_images)] for i in range(num_prompts)]


def check_size(height: int | None, width: int | None, hparams: dict[str, Any]) -> tuple[int, int]:
    """height/width default to the model's training resolution; both must be multiples of the latent factor."""
    from ldm.checkpoints.bundle import latent_factor

    factor = latent_factor(hparams)
    resolution = int(hparams["autoencoder"]["resolution"])
    h, w = (resolution if v is None else int(v) for v in (height, width))
    bad = [f"{name}={v}" for name, v in (("height", h), ("width", w)) if v <= 0 or v % factor]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: height and width must be positive multiples of {factor} "
                          f"(the autoencoder's downsampling times the UNet's); e.g. {max(factor, resolution)}")
    return h, w


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def offline_text_encoder(hparams: dict[str, Any], weights_cache: str | None) -> dict[str, Any] | None:
    """weights_cache=DIR: the published OpenCLIP text model comes from that prefetch cache, hubs off;
    a missing file is an error naming it. Returns the module-argument overrides (None: nothing to change)."""
    if not weights_cache:
        return None
    text = dict(hparams.get("text_encoder") or {})
    if text.get("kind", "openclip") != "openclip" or not (text.get("model_name") and text.get("pretrained")):
        return None  # random or trained conditioners travel inside the checkpoint
    from ldm.weights import openclip_weights

    cache = Path(str(weights_cache)) / "open_clip"
    if openclip_weights(cache, text["model_name"], text["pretrained"]) is None:
        raise ConfigError(f"weights_cache={weights_cache}: no OpenCLIP {text['model_name']} / {text['pretrained']} "
                          f"file in {cache / text['model_name'] / text['pretrained']}; fetch it where there is internet: "
                          f"python -m ldm.prefetch stage=ldm model.text_encoder.model_name={text['model_name']} "
                          f"model.text_encoder.pretrained={text['pretrained']} paths.weights_cache={weights_cache}")
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    return {"text_encoder": {**text, "cache_dir": str(cache)}}


def _check_settings(cfg: Any) -> None:
    if cfg.get("sampler") is not None and cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={cfg.sampler!r}: choose one of {SAMPLERS}")
    for key in ("num_images", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if cfg.get("steps") is not None and int(cfg.steps) < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    if cfg.get("precision", "fp32") not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: choose one of {list(PRECISIONS)}")
    seeds = cfg.get("seeds")
    if seeds is not None:
        if isinstance(seeds, (int, str)) or not len(seeds):
            raise ConfigError(f"seeds={seeds}: give a non-empty list, e.g. seeds=[1,2,3]")
        try:
            [int(s) for s in seeds]
        except (TypeError, ValueError):
            raise ConfigError(f"seeds={list(seeds)}: every seed must be an integer") from None


def check_prompts_fit(conditioner: Any, prompts: list[str]) -> None:
    """A class-conditional model reads prompts as class labels: say which prompt is not one before sampling."""
    from ldm.conditioning.class_embedding import ClassEmbedder

    if not isinstance(conditioner, ClassEmbedder):
        return
    try:
        conditioner.labels(prompts)
    except ValueError as err:
        names = conditioner.class_names or []
        known = (f"its class names ({len(names)}, e.g. {names[:3]})" if names
                 else f"an integer in [0, {conditioner.num_classes})")
        raise ConfigError(f"this model is class-conditional (model.text_encoder.kind=class): each prompt must be "
                          f"{known} or \"\" for unconditional; {err}") from None


def run_sampling(cfg: Any) -> dict[str, Any]:
    """Generate the images sample.yaml describes; returns the output folder, count and manifest records."""
    from ldm.checkpoints.bundle import load_ldm, read_hparams

    _check_settings(cfg)
    prompts = read_prompts(cfg.prompt, cfg.prompts_file, cfg.shapes_prompts, cfg.seed)
    device = resolve_device(cfg.device)
    precision = str(cfg.get("precision", "fp32"))
    ckpt = resolve_checkpoint(cfg.ckpt, cfg.paths.runs)
    try:
        hparams = read_hparams(ckpt)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"ckpt={ckpt}: cannot read it as a stage=ldm checkpoint or export: {err}") from err
    height, width = check_size(cfg.get("height"), cfg.get("width"), hparams)
    sampler = cfg.get("sampler") or hparams.get("sampler", "ddim")
    from ldm.diffusion import samplers

    if hasattr(samplers, "check_sampler"):  # diffusion vs flow samplers
        try:
            samplers.check_sampler(sampler, hparams.get("prediction_type", "epsilon"))
        except ValueError as err:
            raise ConfigError(f"sampler={sampler}: {err}") from None
    steps = int(cfg.get("steps") or hparams.get("num_inference_steps", 50))
    guidance = float(hparams.get("guidance_scale", 1.0) if cfg.guidance_scale is None else cfg.guidance_scale)
    negative = str(cfg.negative_prompt or "")
    interval = cfg.get("guidance_interval")
    interval = list(interval) if interval is not None else hparams.get("guidance_interval")
    try:
        samplers.check_guidance_interval(interval)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    per_prompt = image_seeds(len(prompts), int(cfg.num_images), int(cfg.seed), cfg.get("seeds"))
    jobs = [(p, s) for p, ss in zip(prompts, per_prompt, strict=True) for s in ss]

    module = load_ldm(ckpt, offline_text_encoder(hparams, cfg.get("weights_cache"))).to(device)
    check_prompts_fit(module.text_encoder, [*prompts, negative])
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[ldm] {len(jobs)} images of {height}x{width} from {ckpt} ({sampler}, {steps} steps, guidance {guidance}, "
          f"{device}, {precision})")
    images, records = [], []
    bar = tqdm(total=len(jobs), desc="sampling", unit="img", disable=not cfg.get("progress", True))
    for start in range(0, len(jobs), int(cfg.batch_size)):
        chunk = jobs[start:start + int(cfg.batch_size)]
        with autocast(device, precision):
            batch = module.generate([p for p, _ in chunk], seeds=[s for _, s in chunk], num_inference_steps=steps,
                                    guidance_scale=guidance, negative_prompt=negative, sampler=sampler,
                                    guidance_interval=interval,
                                    use_ema=bool(cfg.use_ema), height=height, width=width)
        batch = batch.float().cpu()
        for (prompt, seed), arr, img in zip(chunk, to_uint8(batch), batch, strict=True):
            name = f"{len(records):05d}.png"
            Image.fromarray(arr).save(out / name)
            records.append({"file": name, "prompt": prompt, "negative_prompt": negative, "seed": seed,
                            "steps": steps, "guidance_scale": guidance, "guidance_interval": interval,
                            "sampler": sampler,
                            "height": height, "width": width})
            images.append(img)
        bar.update(len(chunk))
    bar.close()
    stacked = torch.stack(images)
    make_grid(stacked).save(out / "grid.png")
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    result: dict[str, Any] = {"out": str(out), "num_images": len(records), "checkpoint": str(ckpt),
                              "records": records}
    if _should_score(cfg.score_shapes, prompts):
        from ldm.data.analyze import accuracy_from, analyze_batch, confusion_errors, confusion_from

        pairs = analyze_batch(stacked, [r["prompt"] for r in records])
        acc, table = accuracy_from(pairs), confusion_from(pairs)
        result["prompt_accuracy"] = acc
        result["prompt_confusion"] = table
        # confusion: {attribute: {wanted: {got: count}}}, "other" where the analyzer saw no palette colour/shape
        (out / "prompt_accuracy.json").write_text(json.dumps({**acc, "confusion": table}, indent=2))
        print("[ldm] prompt accuracy by the shapes analyzer: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        misses = confusion_errors(table)
        if misses:
            print(f"[ldm] misses (wanted -> got: count): {json.dumps(misses)}")
    print(f"[ldm] wrote {len(records)} images, grid.png and manifest.jsonl to {out}")
    return result


def _should_score(setting: Any, prompts: list[str]) -> bool:
    if setting in (False, "false", "no"):
        return False
    from ldm.data.shapes import parse_caption

    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        if setting is True:
            raise
        return False
    return True
