"""`python -m ldm.evaluate`: checkpoint -> N samples split over ranks -> FID / CLIP score / prompt accuracy.

Sample i has prompt i (cycled) and seed `seed + i`, and ranks draw contiguous index ranges, so the set of
images does not depend on the world size. The samples go through the same loop and the same metric objects
as training's validation (ldm.metrics.generation), so at equal samples, seeds and reference the two report
one FID. Reference statistics are computed once per data set and extractor and reused (ldm.metrics.reference).
Lightning launches the ranks (trainer.devices, trainer.num_nodes; gloo on CPUs, NCCL on GPUs, srun on SLURM).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.metrics.generation import (
    METRIC_SEED_OFFSET,
    GenerationMetrics,
    metric_seeds,
    rank_share,
    sample_and_score,
)
from ldm.metrics.reference import check_extractor, describe, fid_settings, load_stats, save_stats, stats_path
from ldm.sampling import PRECISIONS, autocast, check_prompts_fit, offline_text_encoder, read_prompts
from ldm.train.checks import ConfigError

ATTRIBUTES = ("color", "background", "shape", "all")


@dataclass
class Reference:
    """Where FID's real statistics come from: a saved file, or shards (cached at `path` when it is set)."""

    urls: list[str] | None
    path: Path | None
    description: dict[str, Any] | None
    resolution: int
    limit: int | None
    caption_key: Any
    batch_size: int
    num_workers: int
    status: str = ""  # file | hit | computed | saved
    num_images: int = 0

    def summary(self) -> dict[str, Any]:
        return {"shards": self.urls, "stats": str(self.path) if self.path else None, "status": self.status,
                "num_images": self.num_images, "samples_limit": self.limit, "resolution": self.resolution}


@dataclass
class Sampling:
    """How each image is drawn: the settings metrics.json records beside the numbers."""

    sampler: str
    steps: int
    guidance_scale: float
    guidance_interval: list[float] | None
    negative_prompt: str
    seed: int
    use_ema: bool
    precision: str
    height: int
    width: int
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)


class EvaluationModule(pl.LightningModule):
    """One test step per rank: the reference statistics, then this rank's share of samples; metrics at epoch end."""

    def __init__(self, model: pl.LightningModule, metrics: GenerationMetrics, prompts: list[str], seeds: list[int],
                 sampling: Sampling, reference: Reference | None, score_shapes: bool, images_dir: Path | None,
                 progress: bool = True, checkpoint: str | Path = "") -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.model = model.eval().requires_grad_(False)
        self.metrics = metrics
        self.prompts, self.seeds = prompts, seeds
        self.sampling = sampling
        self.reference = reference
        self.score_shapes = score_shapes
        self.images_dir = images_dir
        self.progress = progress
        self.pairs: list[tuple[dict[str, str], dict[str, str]]] = []
        self.result: dict[str, Any] = {}

    def test_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)  # one step: the whole share of this rank

    @torch.no_grad()
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._check_same_checkpoint()
        if self.metrics.fid is not None and self.reference is not None:
            self._load_reference()
        start, stop = rank_share(len(self.prompts), self.global_rank, self.trainer.world_size)
        bar = tqdm(total=stop - start, desc=f"sampling (rank {self.global_rank})", unit="img",
                   disable=not (self.progress and self.global_rank == 0))

        def on_batch(offset: int, images: torch.Tensor, prompts: list[str]) -> None:
            if self.score_shapes:
                from ldm.data.analyze import analyze_batch

                self.pairs += analyze_batch(images.float().cpu(), prompts)
            if self.images_dir is not None:
                from ldm.train.images import to_uint8

                for j, arr in enumerate(to_uint8(images.float().cpu())):
                    Image.fromarray(arr).save(self.images_dir / f"{start + offset + j:06d}.png")
            bar.update(len(prompts))

        sample_and_score(self._generate, self.metrics, self.prompts[start:stop], self.seeds[start:stop],
                         self.sampling.batch_size, on_batch=on_batch)
        bar.close()

    def _check_same_checkpoint(self) -> None:
        """ckpt=latest resolves on every rank: a run that saved meanwhile would give ranks different weights."""
        mine = str(self.checkpoint)
        first = self.trainer.strategy.broadcast(mine)
        if first != mine:
            raise ConfigError(f"ckpt: rank {self.global_rank} loaded {mine} but rank 0 loaded {first} (a newer "
                              f"checkpoint appeared while the ranks started); pass ckpt=PATH")

    def _generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        s = self.sampling
        with autocast(self.device, s.precision):
            return self.model.generate(prompts, seeds=seeds, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                                       negative_prompt=s.negative_prompt, sampler=s.sampler,
                                       guidance_interval=s.guidance_interval, use_ema=s.use_ema, height=s.height,
                                       width=s.width).float()

    def _load_reference(self) -> None:
        """Every rank takes the branch rank 0 saw (a cache file appearing meanwhile cannot split them)."""
        ref, strategy = self.reference, self.trainer.strategy
        have = strategy.broadcast(ref.path is not None and ref.path.is_file())
        if have:
            stats = load_stats(ref.path)[0] if self.global_rank == 0 else None
            self.metrics.load_real_statistics(stats)
            ref.status = ref.status or "hit"
        else:
            from ldm.reference_images import ReferenceImages

            images = ReferenceImages(ref.urls, resolution=ref.resolution, batch_size=ref.batch_size,
                                     rank=self.global_rank, world_size=self.trainer.world_size, limit=ref.limit,
                                     caption_key=ref.caption_key)
            workers = ref.num_workers
            loader = DataLoader(images, batch_size=None, num_workers=workers, persistent_workers=False,
                                prefetch_factor=2 if workers else None)
            for batch in loader:
                self.metrics.update_real(batch["image"].to(self.device))
            total = {k: strategy.reduce(v.to(strategy.root_device), reduce_op="sum")
                     for k, v in self.metrics.real_statistics().items()}
            self.metrics.load_real_statistics(total if self.global_rank == 0 else None)
            ref.status = "computed"
            if ref.path is not None and self.global_rank == 0:
                save_stats(ref.path, total, ref.description)
                ref.status = "saved"
        count = self.metrics.fid.real_features_num_samples.clone().to(strategy.root_device)
        ref.num_images = int(strategy.reduce(count, reduce_op="sum"))

    def on_test_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.metrics.compute().items()}  # synchronizes the states over ranks
        strategy = self.trainer.strategy
        if self.score_shapes:
            from ldm.data.analyze import accuracy_from

            n = len(self.pairs)
            acc = accuracy_from(self.pairs) if n else dict.fromkeys(ATTRIBUTES, 0.0)
            hits = torch.tensor([round(acc[k] * n) for k in ATTRIBUTES] + [n], dtype=torch.float64,
                                device=strategy.root_device)
            hits = strategy.reduce(hits, reduce_op="sum")
            values["prompt_accuracy"] = {k: float(hits[i] / hits[-1]) for i, k in enumerate(ATTRIBUTES)}
        self.result = values


# ---------------------------------------------------------------------------------------------------------------
# Settings, checked before anything heavy loads


def _check_settings(cfg: Any) -> None:
    from ldm.diffusion.samplers import SAMPLERS

    for key in ("num_samples", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if cfg.get("sampler") is not None and cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={cfg.sampler!r}: choose one of {SAMPLERS}")
    if cfg.get("steps") is not None and int(cfg.steps) < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: choose one of {list(PRECISIONS)}")
    if cfg.ref_shards and cfg.ref_stats:
        raise ConfigError("give ref_shards=... (reference images) or ref_stats=... (statistics saved earlier), "
                          "not both")
    if cfg.ref_samples is not None and int(cfg.ref_samples) < 2:
        raise ConfigError(f"ref_samples={cfg.ref_samples}: FID needs at least 2 reference images (null: all)")
    if cfg.ref_stats and not Path(str(cfg.ref_stats)).is_file():
        raise ConfigError(f"ref_stats={cfg.ref_stats}: no such file")
    if not cfg.prompts_file and not cfg.ref_shards:
        raise ConfigError("no prompts: give prompts_file=FILE, or ref_shards=... to prompt with the reference "
                          "captions")
    if int(cfg.data.num_workers) < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")


def _metric_settings(cfg: Any, hparams: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """metrics.fid / metrics.clip_score over the checkpoint's own validation settings (null: theirs)."""
    trained = hparams.get("metrics") or {}
    out = []
    for name in ("fid", "clip_score"):
        asked = OmegaConf.to_container(cfg.metrics[name], resolve=True) if cfg.metrics.get(name) else {}
        if asked.pop("enabled", True) is False:
            out.append(None)
            continue
        merged = {k: v for k, v in dict(trained.get(name) or {}).items() if k != "enabled"}
        merged.update({k: v for k, v in asked.items() if v is not None})
        out.append(merged)
    fid, clip = out
    if fid is not None:
        fid = fid_settings(fid)
        from ldm.metrics.fid import FID_EXTRACTORS

        if fid["extractor"] not in FID_EXTRACTORS:
            raise ConfigError(f"metrics.fid.extractor={fid['extractor']!r}: choose one of {FID_EXTRACTORS}")
    return fid, clip


def _reference(cfg: Any, fid: dict[str, Any] | None, resolution: int) -> tuple[Reference | None, list[str] | None]:
    """The reference plan and the shard list (None when there are no shards)."""
    from ldm.data.shards import expand_shards

    urls = None
    if cfg.ref_shards:
        spec = cfg.ref_shards
        spec = list(spec) if not isinstance(spec, str) else spec
        try:
            urls = expand_shards(spec)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"ref_shards={cfg.ref_shards}: {err}") from None
    if fid is None:
        return None, urls
    limit = int(cfg.ref_samples) if cfg.ref_samples is not None else None
    common = dict(resolution=resolution, limit=limit, caption_key=cfg.data.caption_key,
                  batch_size=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers))
    if cfg.ref_stats:
        path = Path(str(cfg.ref_stats))
        try:
            _, description = load_stats(path)
            check_extractor(description, fid, path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"ref_stats={path}: {err}") from None
        return Reference(urls=None, path=path, description=description, status="file", **common), urls
    if urls is None:
        raise ConfigError("metrics.fid needs reference images: give ref_shards=... or ref_stats=... "
                          "(or metrics.fid.enabled=false)")
    description = describe(urls, resolution, limit, fid)
    path = stats_path(str(cfg.ref_cache), description) if cfg.get("ref_cache") else None
    return Reference(urls=urls, path=path, description=description, **common), urls


def _prompts(cfg: Any, urls: list[str] | None) -> list[str]:
    """num_samples prompts: the file's lines or the reference captions in shard order, cycled."""
    if cfg.prompts_file:
        base = read_prompts(None, cfg.prompts_file, 0, 0)
    else:
        from ldm.reference_images import first_captions

        base = first_captions(urls, int(cfg.num_samples), cfg.data.caption_key)
        if not base:
            raise ConfigError(f"ref_shards={cfg.ref_shards}: no samples to take captions from")
    n = int(cfg.num_samples)
    return [base[i % len(base)] for i in range(n)]


def _trainer(cfg: Any, out: Path) -> pl.Trainer:
    from ldm.train.faults import build_strategy

    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["strategy"] = build_strategy(args.get("strategy", "auto"), cfg.faults.get("collective_timeout_s"),
                                      devices=args.get("devices", 1), num_nodes=args.get("num_nodes", 1))
    return pl.Trainer(**args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, inference_mode=False,
                      default_root_dir=str(out))


_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def _ranks_for_this_job() -> Iterator[None]:
    """Under `-m`, each job starts its own ranks: Lightning leaves its process group and the launch variables
    (LOCAL_RANK, MASTER_PORT...) in the launching process, and the next job would talk to the finished job's
    ranks. Every rank ends the group; the process that launched ranks here restores those variables."""
    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank is done with the group before it goes
            torch.distributed.destroy_process_group()
        if before["LOCAL_RANK"] is None and os.environ.get("LOCAL_RANK") is not None:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    except ValueError:
        return []


def run_evaluation(cfg: Any) -> dict[str, Any]:
    """Evaluate the checkpoint evaluate.yaml names; rank 0 writes OUT/metrics.json. Returns what it holds."""
    from ldm.checkpoints.bundle import load_ldm, read_hparams
    from ldm.diffusion import samplers
    from ldm.sampling import _should_score, check_size, resolve_checkpoint

    started = time.time()
    _check_settings(cfg)
    ckpt = resolve_checkpoint(cfg.ckpt, cfg.paths.runs)
    try:
        hparams = read_hparams(ckpt)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"ckpt={ckpt}: cannot read it as a stage=ldm checkpoint or export: {err}") from err
    height, width = check_size(None, None, hparams)
    sampler = cfg.sampler or hparams.get("sampler", "ddim")
    try:
        samplers.check_sampler(sampler, hparams.get("prediction_type", "epsilon"))
        interval = list(cfg.guidance_interval) if cfg.guidance_interval is not None else hparams.get("guidance_interval")
        samplers.check_guidance_interval(interval)
    except ValueError as err:
        raise ConfigError(f"sampler={sampler} / guidance_interval: {err}") from None
    seed = int(cfg.seed) if cfg.seed is not None else int(hparams.get("val_seed", 0)) + METRIC_SEED_OFFSET
    sampling = Sampling(sampler=sampler, steps=int(cfg.steps or hparams.get("num_inference_steps", 50)),
                        guidance_scale=float(hparams.get("guidance_scale", 1.0) if cfg.guidance_scale is None
                                             else cfg.guidance_scale),
                        guidance_interval=interval, negative_prompt=str(cfg.negative_prompt or ""), seed=seed,
                        use_ema=bool(cfg.use_ema), precision=str(cfg.precision), height=height, width=width,
                        batch_size=int(cfg.batch_size))
    fid, clip = _metric_settings(cfg, hparams)
    resolution = int(cfg.data.resolution or height)
    reference, urls = _reference(cfg, fid, resolution)
    prompts = _prompts(cfg, urls)
    seeds = metric_seeds(seed, 0, len(prompts))
    score = _should_score(cfg.score_shapes, prompts)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images" if cfg.keep_images else None
    if images_dir is not None:
        images_dir.mkdir(exist_ok=True)

    model = load_ldm(ckpt, offline_text_encoder(hparams, cfg.get("weights_cache")))
    check_prompts_fit(model.text_encoder, [*prompts, sampling.negative_prompt])
    metrics = GenerationMetrics(fid=fid, clip_score=clip)
    module = EvaluationModule(model, metrics, prompts, seeds, sampling, reference, score, images_dir,
                              progress=bool(cfg.progress), checkpoint=Path(ckpt).resolve())
    trainer = _trainer(cfg, out)
    from ldm.train.ddp import CHILD_ARGV_ENV, pin_run_dir_for_children

    pin_run_dir_for_children(out)
    if os.environ.get(CHILD_ARGV_ENV):  # ranks Lightning starts from here load this very file (not a newer latest)
        os.environ[CHILD_ARGV_ENV] = json.dumps([*json.loads(os.environ[CHILD_ARGV_ENV]), f'ckpt="{Path(ckpt).resolve()}"'])
    print(f"[ldm] evaluating {ckpt}: {len(prompts)} samples of {height}x{width} ({sampler}, {sampling.steps} steps, "
          f"guidance {sampling.guidance_scale}, seeds {seed}..{seed + len(prompts) - 1})", flush=True)
    with _ranks_for_this_job():
        trainer.test(module, verbose=False)
    result = {"checkpoint": str(ckpt), "num_samples": len(prompts), "world_size": trainer.world_size,
              "metrics": module.result,
              "settings": {k: v for k, v in vars(sampling).items() if k != "extra"},
              "fid": fid, "clip_score": clip, "prompts": str(cfg.prompts_file) if cfg.prompts_file else "ref_shards",
              "reference": reference.summary() if reference is not None else None,
              "overrides": _task_overrides(), "wall_seconds": round(time.time() - started, 1)}
    if trainer.is_global_zero:
        from ldm.checkpoints.files import write_json

        if images_dir is not None:
            with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
                for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
                    f.write(json.dumps({"file": f"images/{i:06d}.png", "prompt": p, "seed": s}) + "\n")
        write_json(result, out / "metrics.json")
        print(f"[ldm] {format_metrics(module.result)}; wrote {out / 'metrics.json'}")
    return result


def format_metrics(values: dict[str, Any]) -> str:
    parts = [f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)]
    acc = values.get("prompt_accuracy")
    if acc:
        parts.append("prompt accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return "; ".join(parts)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ldm.train.entry import run_reporting_errors

    run_reporting_errors(lambda: run_evaluation(cfg))


if __name__ == "__main__":
    import sys

    from ldm.train.ddp import apply_pinned_argv
    from ldm.train.entry import quote_shard_patterns

    apply_pinned_argv()
    sys.argv[1:] = quote_shard_patterns(sys.argv[1:])
    main()
