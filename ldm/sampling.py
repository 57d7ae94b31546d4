"""sample.py's work: checkpoint -> prompts -> PNGs, a grid and manifest.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.diffusion.samplers import SAMPLERS
from ldm.train.checks import ConfigError
from ldm.train.images import make_grid, to_uint8
from ldm.train.run_dir import find_latest_checkpoint


def resolve_checkpoint(ckpt: str, runs: str) -> Path:
    if ckpt in (None, "", "latest"):
        found = find_latest_checkpoint(runs, "ldm")
        if found is None:
            raise ConfigError(f"no stage=ldm checkpoint under {runs}/ldm; train one (python train.py stage=ldm) "
                              f"or pass ckpt=PATH")
        return found
    path = Path(ckpt)
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt}: no such file")
    return path


def read_prompts(prompt: str | None, prompts_file: str | None, shapes_prompts: int, seed: int) -> list[str]:
    if prompt and prompts_file:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    if prompt:
        return [str(prompt)]
    if prompts_file:
        lines = [ln.strip() for ln in Path(prompts_file).read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise ConfigError(f"prompts_file={prompts_file} holds no prompts")
        return prompts
    from ldm.data.shapes import prompt_set

    return prompt_set(int(shapes_prompts), seed=seed)


def load_module(path: Path, device: torch.device):
    from ldm.diffusion.module import LatentDiffusionModule

    module = LatentDiffusionModule.load_from_checkpoint(str(path), map_location="cpu", autoencoder_path=None)
    return module.to(device).eval()


def run_sampling(cfg: Any) -> dict[str, Any]:
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={cfg.sampler!r}: choose one of {SAMPLERS}")
    if int(cfg.steps) < 1 or int(cfg.num_images) < 1:
        raise ConfigError("steps and num_images must be >= 1")
    ckpt = resolve_checkpoint(cfg.ckpt, cfg.paths.runs)
    prompts = read_prompts(cfg.prompt, cfg.prompts_file, cfg.shapes_prompts, cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    module = load_module(ckpt, device)
    guidance = module.hparams.guidance_scale if cfg.guidance_scale is None else float(cfg.guidance_scale)
    jobs = [(p, int(cfg.seed) + i * int(cfg.num_images) + k)
            for i, p in enumerate(prompts) for k in range(int(cfg.num_images))]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images, records = [], []
    print(f"[ldm] sampling {len(jobs)} images from {ckpt} ({cfg.sampler}, {cfg.steps} steps, guidance {guidance})")
    for start in tqdm(range(0, len(jobs), int(cfg.batch_size)), desc="batches"):
        chunk = jobs[start:start + int(cfg.batch_size)]
        batch = module.generate([p for p, _ in chunk], seeds=[s for _, s in chunk], num_inference_steps=int(cfg.steps),
                                guidance_scale=guidance, negative_prompt=cfg.negative_prompt, sampler=cfg.sampler,
                                use_ema=bool(cfg.use_ema)).cpu()
        for (prompt, seed), arr, img in zip(chunk, to_uint8(batch), batch, strict=True):
            name = f"{len(records):05d}.png"
            Image.fromarray(arr).save(out / name)
            records.append({"file": name, "prompt": prompt, "seed": seed, "steps": int(cfg.steps),
                            "guidance_scale": guidance, "sampler": cfg.sampler})
            images.append(img)
    stacked = torch.stack(images)
    make_grid(stacked).save(out / "grid.png")
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    result: dict[str, Any] = {"out": str(out), "num_images": len(records), "checkpoint": str(ckpt)}
    if _should_score(cfg.score_shapes, prompts):
        from ldm.data.analyze import prompt_accuracy

        acc = prompt_accuracy(stacked, [r["prompt"] for r in records])
        result["prompt_accuracy"] = acc
        (out / "prompt_accuracy.json").write_text(json.dumps(acc, indent=2))
        print("[ldm] prompt accuracy by the shapes analyzer: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
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
