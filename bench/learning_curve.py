"""Prompt accuracy against training samples seen, one row per (recipe, evaluation): what makes stage 2 learn.

Each recipe is a list of Hydra overrides on top of `stage=ldm` (the same config train.py composes). The
module is built as train.py builds it and trained by a plain loop on the shapes training set held in memory,
encoded once per autoencoder (as `data=latents` would do): the loss is the module's own `diffusion_loss`,
the optimizer its `configure_optimizers`, EMA as in training. Every --eval-every steps the EMA model samples
the 64 prompts `sample.py shapes_prompts=64` draws (the whole vocabulary: every colour and background 8 times)
with the recipe's sampler, and the shapes analyzer scores them. Wall times are training only (sampling is
reported apart); on a shared CPU they are noisy, samples seen are not.

    python bench/learning_curve.py --recipes eps,flow --steps 600 --eval-every 200    # train, append rows
    python bench/learning_curve.py --table                                             # print the table
    python bench/learning_curve.py --list                                              # the recipes

Results accumulate in --out/curves.jsonl (one JSON row per evaluation); --table prints them as markdown.
`{f2}`, `{f4}` in a recipe stand for --f2 and --f4 (autoencoder exports).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# The built-in run's recipe is conf/experiment/shapes.yaml; "shapes" measures it, the others move one lever
# at a time away from the paper's defaults (experiment=none) or from it.
BASE = ["~recipe", "model.autoencoder.init_from={f2}"]
SHAPES = ["model.autoencoder.init_from={f2}"]
BS16 = [*SHAPES, "data.batch_size=16"]
# the recipe before batch 64 and the smaller UNet (what the *_pooled_attn84 rows measured)
B32 = [*SHAPES, "data.batch_size=32", "model.unet.channel_mult=[1,2,4]"]
RECIPES: dict[str, list[str]] = {
    # objective, from the paper's defaults (epsilon, frozen random text tower, tiny UNet, lr 1e-3, batch 16)
    "eps": BASE,
    "eps_offset": [*BASE, "stage.module.offset_noise=0.1"],
    "v_zsnr": [*BASE, "experiment=v_prediction"],
    "flow": [*BASE, "experiment=flow"],
    # conditioner
    "flow_text": [*BASE, "experiment=flow", "model.text_encoder.freeze=false"],
    "flow_class": [*BASE, "experiment=flow", "model/text_encoder=class"],
    # the built-in recipe and levers around it
    "shapes": SHAPES,
    "shapes_frozen_text": [*SHAPES, "model.text_encoder.freeze=true"],
    "shapes_class": [*SHAPES, "model/text_encoder=class"],
    "shapes_lr1e-3": [*SHAPES, "stage.module.lr=1e-3"],
    "shapes_bs64": [*SHAPES, "data.batch_size=64"],
    "shapes_bs8": [*SHAPES, "data.batch_size=8"],
    # the recipe before it clipped gradients (the docs/results.md rows "shapes" and "shapes_bs8" were measured so)
    "shapes_noclip": [*SHAPES, "trainer.gradient_clip_val=null"],
    "shapes_bs8_noclip": [*SHAPES, "data.batch_size=8", "trainer.gradient_clip_val=null"],
    # batch 16 (the recipe clips at 1.0 itself) and levers around it
    "shapes_bs16_clip": BS16,
    "shapes_bs8_clip_attn84": [*SHAPES, "data.batch_size=8", "model.unet.attention_resolutions=[2,4]"],
    "shapes_bs16_clip_textlr1e-4": [*BS16, "stage.module.text_encoder_lr=1e-4"],
    "shapes_bs16_clip_wide": [*BS16, "model.unet.model_channels=48", "model.unet.num_head_channels=48"],
    "shapes_bs16_clip_v": [*BS16, "experiment=v_prediction"],
    "shapes_bs16_clip_attn84": [*BS16, "model.unet.attention_resolutions=[2,4]"],
    "shapes_ema0.999": [*SHAPES, "stage.module.ema_decay=0.999"],
    "shapes_attn_full": [*SHAPES, "model.unet.attention_resolutions=[1,2,4]"],
    "shapes_lr2e-3": [*SHAPES, "stage.module.lr=2e-3"],
    "shapes_wide": [*SHAPES, "model.unet.model_channels=64"],
    "shapes_depth2": [*SHAPES, "model.unet.num_res_blocks=2"],
    "shapes_v": [*SHAPES, "experiment=v_prediction"],
    "shapes_snr5": [*SHAPES, "stage.module.snr_gamma=5"],
    "shapes_bs64_lr2e-3": [*SHAPES, "data.batch_size=64", "stage.module.lr=2e-3"],
    "shapes_mc64": [*SHAPES, "model.unet.model_channels=64", "model.unet.num_head_channels=64"],
    # warm-up, stable, then a linear lr decay to 0 over the second half of the budget
    "shapes_wsd1800": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1800"],
    "shapes_depth2_wsd1500": [*SHAPES, "model.unet.num_res_blocks=2", "stage.module.lr_decay_fraction=0.5",
                              "stage.module.lr_decay_end=1500"],
    "shapes_wsd1800_snr5": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1800",
                            "stage.module.snr_gamma=5"],
    "shapes_wsd1800_lr2e-3": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1800",
                              "stage.module.lr=2e-3"],
    # timesteps drawn nearer the data end (logit-normal mean < 0): the 1,500-step model's weak range is t <= 0.4
    "shapes_wsd1500_lm-0.6": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1500",
                              "stage.module.flow.logit_mean=-0.6"],
    "shapes_wsd1500_lm-1.0": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1500",
                              "stage.module.flow.logit_mean=-1.0"],
    "shapes_wsd1500": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1500"],
    # the prompt's token mean added to the time embedding: every ResBlock sees the prompt, not only attention
    "shapes_wsd1500_pooled": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1500",
                              "model.unet.pooled_context=true"],
    # model guidance (one more no-grad forward a step, ~1.3x the step): the same wall time as 1,500 plain steps
    "shapes_wsd1150_mg0.6": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1150",
                             "stage.module.model_guidance=0.6"],
    "shapes_wsd1150_pooled_mg0.6": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1150",
                                    "stage.module.model_guidance=0.6", "model.unet.pooled_context=true"],
    # the pooled path gives every level the prompt: is attention at 16x16 (30% of a step) still needed?
    "shapes_wsd1950_pooled_attn84": [*B32, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=1950",
                                     "model.unet.pooled_context=true", "model.unet.attention_resolutions=[2,4]"],
    "shapes_wsd2800_pooled_attn84": [*B32, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=2800",
                                     "model.unet.pooled_context=true", "model.unet.attention_resolutions=[2,4]"],
    # batch 64 (1.26x the samples a second of batch 32 on 2 cores), with and without the smaller UNet
    # (channel_mult [1,2,2], attention at 4x4 and the middle only: 1.4M parameters, 0.54x the step)
    "shapes_bs64_wsd1600": [*SHAPES, "model.unet.channel_mult=[1,2,4]", "data.batch_size=64", "stage.module.lr_decay_fraction=0.5",
                            "stage.module.lr_decay_end=1600", "model.unet.pooled_context=true",
                            "model.unet.attention_resolutions=[2,4]"],
    "shapes_small_wsd2800": [*SHAPES, "data.batch_size=64", "stage.module.lr_decay_fraction=0.5",
                             "stage.module.lr_decay_end=2800", "model.unet.channel_mult=[1,2,2]",
                             "model.unet.attention_resolutions=[4]"],
    "shapes_bs16_wsd2600_pooled": [*SHAPES, "stage.module.lr_decay_fraction=0.5", "stage.module.lr_decay_end=2600",
                                   "model.unet.pooled_context=true", "data.batch_size=16"],
    # compression factor at equal UNet settings (the shapes recipe): pixel space, f2, f4
    "shapes_f1": ["model/autoencoder=identity"],
    "shapes_f2": SHAPES,
    "shapes_f4": ["model.autoencoder.init_from={f4}"],
    "shapes_f1_attn84": ["model/autoencoder=identity", "model.unet.attention_resolutions=[2,4]"],
}


def load_shapes(shards: Path, cache: Path) -> tuple[torch.Tensor, list[str]]:
    """Every training image (uint8, N x 3 x H x W) and caption of the shapes shards, cached as one file."""
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["images"], data["captions"]
    from PIL import Image

    images, captions = [], []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name[:-4]
                img = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                captions.append(tar.extractfile(members[key + ".txt"]).read().decode().strip())
    data = {"images": torch.stack(images), "captions": captions}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data["images"], data["captions"]


@torch.no_grad()
def encode_all(autoencoder: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Posterior moments (mean, logvar) of every image: the encoder runs once per autoencoder."""
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].float() / 127.5 - 1.0
        post = autoencoder.encode(x)
        out.append(torch.cat([post.mean, post.logvar], dim=1))
    return torch.cat(out)


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=["stage=ldm", "logger=csv", *overrides])


def class_conditioner(cfg: Any) -> None:
    """model/text_encoder=class on the shapes data: one class per caption (8 x 3 x 7 = 168)."""
    from omegaconf import open_dict

    from ldm.data.shapes import all_prompts

    if cfg.model.text_encoder.get("kind") == "class":
        with open_dict(cfg):
            names = all_prompts()
            cfg.model.text_encoder.num_classes = len(names)
            cfg.model.text_encoder.class_names = names


def confusion(images: torch.Tensor, prompts: list[str]) -> dict[str, list[tuple[str, str, int]]]:
    """Per attribute, the (wanted, got, count) pairs the analyzer disagreed on, most frequent first."""
    from ldm.data.analyze import analyze_image
    from ldm.data.shapes import parse_caption

    errors: dict[str, Counter] = {k: Counter() for k in ("color", "background", "shape")}
    for image, prompt in zip(images, prompts, strict=True):
        want, got = parse_caption(prompt), analyze_image(image)
        for key, counter in errors.items():
            if want[key] != got[key]:
                counter[(want[key], got[key])] += 1
    return {k: [(w, g, n) for (w, g), n in c.most_common(6)] for k, c in errors.items()}


def evaluate(module: Any, prompts: list[str], guidance: float | None = None, steps: int | None = None
             ) -> tuple[dict[str, float], Any]:
    from ldm.data.analyze import prompt_accuracy

    module.eval()
    images = module.generate(prompts, seed=0, guidance_scale=guidance, num_inference_steps=steps)
    module.train()
    return {k: round(float(v), 3) for k, v in prompt_accuracy(images, prompts).items()}, images


@torch.no_grad()
def restore_accuracy(module: Any, moments: torch.Tensor, captions: list[str], t0: float, steps: int = 20
                     ) -> float | None:
    """Shape accuracy after noising training latents to flow time t0 and sampling back (SDEdit).

    A far more sensitive early signal than sampling from pure noise: at t0 = 0.5 the shape is still plain to
    see, so a denoiser that loses it there is the bottleneck, not the layout at high noise. Flow only.
    """
    from ldm.data.analyze import prompt_accuracy
    from ldm.diffusion.flow import FlowSchedule
    from ldm.diffusion.samplers import classifier_free_guidance

    if not isinstance(module.schedule, FlowSchedule):
        return None
    module.eval()
    z0 = moments[:, : moments.shape[1] // 2] * module.scale_factor
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    fn = classifier_free_guidance(module.ema.model, module.encode_text(captions, use_ema=True),
                                  module.encode_text([""] * len(captions), use_ema=True),
                                  module.hparams.guidance_scale)
    times = torch.linspace(t0, 0.0, steps + 1)
    z = (1 - t0) * z0 + t0 * noise
    for i in range(steps):
        tt = module.schedule.model_time(times[i]).expand(z.shape[0])
        z = z + float(times[i + 1] - times[i]) * fn(z, tt).float()
    module.train()
    return round(float(prompt_accuracy(module.decode_latents(z), captions)["shape"]), 3)


LOSS_TIMES = (0.05, 0.3, 0.6, 0.9)


@torch.no_grad()
def loss_at_times(module: Any, moments: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
    """The EMA model's velocity error at fixed flow times, on fixed latents and noise (flow only).

    Far less noisy than 64 sampled images, and it says where along the path a recipe learns: shape is decided
    at t = 0.3-0.6, and there a model trained 4x as long has about half the error of the recipe's own.
    """
    from ldm.autoencoder.distribution import DiagonalGaussian
    from ldm.diffusion.flow import FlowSchedule

    if not isinstance(module.schedule, FlowSchedule):
        return None
    module.eval()
    z0 = DiagonalGaussian(moments).mode() * module.scale_factor
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    cond = module.encode_text(captions, use_ema=True)
    out = {}
    for t in LOSS_TIMES:
        tt = torch.full((z0.shape[0],), t)
        v = module.ema.model((1 - t) * z0 + t * noise, module.schedule.model_time(tt), cond).float()
        out[f"loss@{t}"] = round(float(((v - (noise - z0)) ** 2).mean()), 4)
    module.train()
    return out


def run_recipe(name: str, overrides: list[str], args: argparse.Namespace, data: dict[str, Any]) -> list[dict]:
    from ldm.autoencoder.distribution import DiagonalGaussian
    from ldm.data.shapes import prompt_set
    from ldm.train.cli import build_module

    cfg = compose([o.format(f2=args.f2, f4=args.f4) for o in overrides] + list(args.override))
    class_conditioner(cfg)
    torch.manual_seed(int(cfg.seed))
    module = build_module(cfg)
    ae_key = json.dumps(module.autoencoder.config, sort_keys=True) + str(cfg.model.autoencoder.get("init_from"))
    if ae_key not in data["moments"]:
        data["moments"][ae_key] = encode_all(module.autoencoder, data["images"])
    moments = data["moments"][ae_key]
    captions = data["captions"]
    batch = int(cfg.data.batch_size)
    module._ensure_scale_factor({"moments": moments[:batch]})
    if args.init:  # continue a saved model (weights and EMA; the optimizer starts afresh with its warm-up)
        module.load_state_dict(torch.load(args.init, weights_only=True))
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    prompts = prompt_set(args.prompts, seed=0)
    unet_params = sum(p.numel() for p in module.unet.parameters())
    rows: list[dict] = []
    train_s = 0.0
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = float(cfg.trainer.get("gradient_clip_val") or "inf")
    interval_loss: list[float] = []
    interval_norm = 0.0
    module.train()
    for step in range(args.start_step, args.start_step + args.steps):
        start = time.perf_counter()
        idx = torch.randint(len(captions), (batch,), generator=torch.Generator().manual_seed(10_000 + step))
        loss, _ = module.diffusion_loss(DiagonalGaussian(moments[idx]), [captions[i] for i in idx], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # What train.py does with trainer.gradient_clip_val (Lightning clips by norm); inf: measure only.
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        interval_loss.append(float(loss.detach()))
        interval_norm = max(interval_norm, norm)
        opt.step()
        sched.step()
        _ema_update(module)
        train_s += time.perf_counter() - start
        last = step + 1 == args.start_step + args.steps
        if (step + 1) % args.eval_every == 0 or last:
            t0 = time.perf_counter()
            acc, images = evaluate(module, prompts, steps=args.sample_steps)
            acc.update(loss_at_times(module, moments[-256:], captions[-256:]) or {})
            for t_start in args.restore:  # the first 64 training images, noised and sampled back
                acc[f"restore@{t_start}"] = restore_accuracy(module, moments[:64], captions[:64], t_start)
            save_grid(images, args.out / "grids" / f"{name}_{step + 1:05d}.png")
            row = {"recipe": name, "step": step + 1, "samples": (step + 1) * batch, "batch": batch,
                   "train_s": round(train_s, 1), "s_per_step": round(train_s / (step + 1 - args.start_step), 4),
                   "eval_s": round(time.perf_counter() - t0, 1),
                   "loss": round(sum(interval_loss) / len(interval_loss), 4), "max_grad_norm": round(interval_norm, 2),
                   "unet_params_m": round(unet_params / 1e6, 2), "f": module.autoencoder.downsample_factor,
                   "sampler": f"{module.hparams.sampler}{args.sample_steps or module.hparams.num_inference_steps}",
                   "guidance": module.hparams.guidance_scale, **acc, "overrides": overrides}
            if last:
                row["confusion"] = confusion(images, prompts)
                for scale in args.guidance:
                    acc_g, images_g = evaluate(module, prompts, guidance=scale, steps=args.sample_steps)
                    row[f"all@g{scale}"] = acc_g
                    save_grid(images_g, args.out / "grids" / f"{name}_{step + 1:05d}_g{scale}.png")
                save_model(module, args.out / "models" / f"{name}.pt")
            rows.append(row)
            interval_loss, interval_norm = [], 0.0
            print(json.dumps({k: v for k, v in row.items() if k not in ("overrides", "confusion")}), flush=True)
            with (args.out / "curves.jsonl").open("a") as f:  # as it comes: a stopped run keeps its rows
                f.write(json.dumps(row) + "\n")
    return rows


def save_grid(images: torch.Tensor, path: Path) -> None:
    """The evaluation's samples as one PNG, 8 per row in prompt order: judge a curve by what it draws."""
    from ldm.train.images import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=8).save(path)


def save_model(module: Any, path: Path) -> None:
    """The trained weights (EMA included), so the last model can be sampled again with other settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)


def _ema_update(module: Any) -> None:
    module.ema.update(module.unet)
    if module.text_encoder_ema is not None:
        module.text_encoder_ema.update(module.text_encoder)


def table(rows: list[dict]) -> str:
    lines = ["| recipe | f | step | samples seen | train s | s/step | loss | max grad norm | colour | background | shape "
             "| all | shape restored from t=0.5 / 0.7 | error at t=" + " / ".join(map(str, LOSS_TIMES)) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        restored = " / ".join(str(r[k]) for k in ("restore@0.5", "restore@0.7") if r.get(k) is not None)
        at_t = " / ".join(str(r[f"loss@{t}"]) for t in LOSS_TIMES if r.get(f"loss@{t}") is not None)
        lines.append(f"| {r['recipe']} | {r['f']} | {r['step']} | {r['samples']} | {r['train_s']} | "
                     f"{r['s_per_step']} | {r.get('loss', '')} | {r.get('max_grad_norm', '')} | {r['color']} | "
                     f"{r['background']} | {r['shape']} | {r['all']} | {restored} | {at_t} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="eps,flow,shapes")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    ap.add_argument("--guidance", type=float, nargs="*", default=[], help="also score the last model at these")
    ap.add_argument("--restore", type=float, nargs="*", default=[0.5, 0.7],
                    help="also score shape after noising training images to these flow times and sampling back")
    ap.add_argument("--f2", default=str(ROOT / "exports" / "autoencoder"), help="the f2 autoencoder export")
    ap.add_argument("--f4", default=str(ROOT / "runs" / "bench" / "exports_f4" / "autoencoder"))
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shapes" / "train")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "curves")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init", type=Path, default=None, help="continue this saved model (--out/models/NAME.pt)")
    ap.add_argument("--start-step", type=int, default=0, help="with --init: the step it was saved at")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every recipe")
    ap.add_argument("--table", action="store_true", help="print the table of --out/curves.jsonl and stop")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    log = args.out / "curves.jsonl"
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name}: {' '.join(overrides)}")
        return
    if args.table:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        print(table(rows))
        for r in rows:
            if "confusion" in r:
                print(f"{r['recipe']} @ {r['step']}: " + "; ".join(
                    f"{k}: " + ", ".join(f"{w}->{g} x{n}" for w, g, n in v) for k, v in r["confusion"].items() if v))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    images, captions = load_shapes(args.shards, args.out / "shapes_train.pt")
    data = {"images": images, "captions": captions, "moments": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.recipes.split(","):
        run_recipe(name, RECIPES[name], args, data)
    print(table([r for line in log.read_text().splitlines() if line.strip()
                 for r in [json.loads(line)] if r["recipe"] in args.recipes.split(",")]))


if __name__ == "__main__":
    main()
