"""Composition: config -> data, module, trainer; fit; export. train.py hands its config here."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from ldm.autoencoder.identity import IdentityAutoencoder
from ldm.bundle import write_bundle
from ldm.checkpoints import autoencoder as ae_ckpt
from ldm.checkpoints.files import RefusedFileError, load_torch_file
from ldm.data.shapes import prompt_set, write_shapes
from ldm.data.text_embeddings import attach_stored_text
from ldm.train.checkpoint_io import AtomicCheckpointIO
from ldm.train.checks import (
    ConfigError,
    check_autoencoder_resolution,
    check_buckets,
    check_ldm,
    resolve_autoencoder_path,
)
from ldm.train.ddp import pin_run_dir_for_children
from ldm.train.faults import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    build_strategy,
    explain_collective_failure,
)
from ldm.train.fsdp import module_for_export
from ldm.train.init_from import load_weights, plan_init
from ldm.train.loggers import make_logger
from ldm.train.perf import apply_backend_flags, apply_model_perf, check_perf, compile_per_shape
from ldm.train.preemption import PreemptionCheckpoint
from ldm.train.progress import LossProgressBar
from ldm.train.run_dir import find_latest_checkpoint, find_run_checkpoint
from ldm.train.signals import own_signal_handlers
from ldm.train.throughput import ThroughputMonitor
from ldm.weights import use_offline_cache

# Frozen parts (autoencoder, text encoder, EMA copy) are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Manual optimization (stage=vae): a checkpoint after step N holds the weights after N updates, with global_step N,
# which is what resuming needs; Lightning's "pre-optimization state" advice does not apply.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
# The shard datamodule resumes mid-epoch itself (its state_dict is in the checkpoint), not through the DataLoader.
warnings.filterwarnings("ignore", message=r".*ended before the epoch ended and your dataloader is not resumable.*")


def run_directory() -> Path:
    """Hydra's run dir; DDP child ranks are relaunched by Lightning with the parent's dir pinned."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        path = Path(os.environ.get("LDM_RUN_DIR", "runs/interactive"))
        path.mkdir(parents=True, exist_ok=True)
        return path


def _task_overrides() -> list[str] | None:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without @hydra.main
        return None


def ensure_shapes_data(cfg: DictConfig) -> None:
    """The built-in data set is written on first use, so `python train.py` works on a fresh clone."""
    if cfg.data.get("name") != "shapes":
        return
    train = Path(str(cfg.data.train_shards))
    if "SLURM_STEP_ID" in os.environ and os.environ.get("SLURM_PROCID", "0") != "0":
        # srun starts every rank at once: rank 0 writes, the others wait for its info.json (written last).
        deadline = time.time() + 900
        while not (train.parent / "info.json").exists() and time.time() < deadline:
            time.sleep(1)
        return
    if train.is_dir() and any(train.glob("*.tar")):
        return
    root = train.parent
    print(f"[ldm] built-in shapes data not found under {root}; writing it (python -m ldm.data.shapes --out {root})")
    write_shapes(root, num_train=20000, num_val=512, resolution=int(cfg.data.resolution))


def resolve_resume(cfg: DictConfig, run_dir: Path | None = None) -> str | None:
    """ckpt=null: fresh; last: the newest of the stage; auto: the newest of this run dir, else fresh; or a path.

    `auto` is what the sbatch scripts pass: a requeued job keeps its run dir (keyed by the job id) and
    continues from whatever it saved last, a first start finds nothing and starts fresh. A requeued SLURM job
    (SLURM_RESTART_COUNT > 0: sbatch scripts and the submitit launcher alike) always resumes that way.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:  # requeued: continue this job, whatever ckpt says
        found = find_run_checkpoint(run_dir if run_dir is not None else run_directory())
        if found is not None:
            print(f"[ldm] requeued SLURM job: resuming from {found}")
            return str(found)
    if not cfg.get("ckpt"):
        return None
    if cfg.ckpt == "auto":
        found = find_run_checkpoint(run_dir if run_dir is not None else run_directory())
        if found is not None:
            print(f"[ldm] ckpt=auto: resuming from {found}")
        return str(found) if found is not None else None
    if cfg.ckpt == "last":
        found = find_latest_checkpoint(cfg.paths.runs, cfg.stage.name)
        if found is None:
            raise ConfigError(f"ckpt=last: no checkpoint of stage {cfg.stage.name} under {cfg.paths.runs}")
        return str(found)
    if not Path(cfg.ckpt).exists():
        raise ConfigError(f"ckpt={cfg.ckpt}: no such file")
    check_resumable(Path(cfg.ckpt))
    return str(cfg.ckpt)


def check_resumable(path: Path) -> None:
    """A file handed to `ckpt=` is read as data first: one that would run code, or is no Lightning checkpoint,
    stops here with its reason instead of inside Lightning's loader with a traceback."""
    try:
        state = load_torch_file(path)
    except RefusedFileError as err:
        raise ConfigError(f"ckpt={path}: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or "state_dict" not in state:
        raise ConfigError(f"ckpt={path}: not a Lightning training checkpoint (no global_step and state_dict); "
                          f"to start from weights, use model.init_from=PATH")


def build_module(cfg: DictConfig) -> pl.LightningModule:
    pixel_space = cfg.model.autoencoder.get("kind") == "identity"
    if cfg.stage.name == "vae":
        if pixel_space:
            raise ConfigError("model/autoencoder=identity has nothing to train: run stage=ldm with it directly")
        if cfg.trainer.get("strategy") == "fsdp":  # before a device is held, not at FSDP's setup
            raise ConfigError("trainer=fsdp shards stage=ldm's UNet; stage=vae trains on every rank whole: "
                              "use trainer=ddp")
        check_autoencoder_resolution(cfg.data.resolution, cfg.model.autoencoder.ch_mult)
        factor = 2 ** (len(cfg.model.autoencoder.ch_mult) - 1)
        check_buckets(cfg, factor, f"autoencoder factor {factor}")
        extra = {"score_shapes": cfg.data.get("name") == "shapes"}
        if cfg.trainer.get("gradient_clip_val") and not cfg.stage.module.get("grad_clip"):
            extra["grad_clip"] = float(cfg.trainer.gradient_clip_val)  # manual optimization clips in the module
        return instantiate(cfg.stage.module, _convert_="all", **extra)
    if cfg.stage.name == "ldm":
        plan = plan_init(cfg, _task_overrides())  # model.init_from / model.unet.init_from
        if plan is not None:
            cfg = plan.apply(cfg)
        if plan is not None and plan.autoencoder_path:
            path = Path(plan.autoencoder_path)
        else:
            path = None if pixel_space else resolve_autoencoder_path(cfg)
        try:
            autoencoder = IdentityAutoencoder(**cfg.model.autoencoder) if pixel_space else ae_ckpt.load_model(path)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"model.autoencoder.init_from={path}: cannot load an autoencoder: {err}") from err
        ae_config = dict(autoencoder.config)
        if plan is not None:
            plan.check_autoencoder(cfg, ae_config)
        check_ldm(cfg, ae_config)
        ae_config["resolution"] = int(cfg.data.resolution)  # samples are drawn at the data's size
        extra: dict[str, Any] = {"autoencoder": ae_config, "autoencoder_path": str(path) if path else None}
        if autoencoder.scaling_factor and cfg.stage.module.get("scale_factor") is None:
            extra["scale_factor"] = float(autoencoder.scaling_factor)  # e.g. SD's 0.18215 from a diffusers config
        if cfg.data.get("name") == "shapes" and cfg.model.text_encoder.get("kind", "openclip") == "openclip":
            # shapes captions as prompts (a class or no conditioner takes none)
            extra["val_prompts"] = prompt_set(int(cfg.stage.num_val_prompts), seed=cfg.seed)
            extra["score_shapes"] = True
        module = instantiate(cfg.stage.module, _convert_="all", **extra)
        if plan is not None:
            load_weights(module, plan)
        return module
    raise ConfigError(f"stage={cfg.stage.name!r}: choose vae or ldm")


def build_datamodule(data_args: dict[str, Any]) -> pl.LightningDataModule:
    """The data config -> its datamodule, with every value and every local shard checked now: a bad one ends
    start-up with one line naming the key (Hydra would wrap it in a traceback), before a device is held."""
    try:
        datamodule = instantiate(data_args, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(str(cause) if str(cause).startswith("data.") else f"data: {cause}") from None
    check = getattr(datamodule, "check_shards", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return datamodule


def _export_sd_layouts(ckpt: Any, model: Any, out: Path, compvis_name: str) -> None:
    """The same weights for outside tools: a diffusers folder and a CompVis-key safetensors file.

    `ckpt` is the model's module in ldm.checkpoints (its save_diffusers / save_compvis).
    """
    for what, save in (("diffusers", lambda: ckpt.save_diffusers(model, out / "diffusers")),
                       ("CompVis", lambda: ckpt.save_compvis(model, out / compvis_name))):
        try:
            save()
        except ValueError as err:  # an architecture that layout cannot express: say so, keep our own export
            print(f"[ldm] no {what} export: {err}")


def export(module: pl.LightningModule, cfg: DictConfig, run_dir: Path) -> None:
    """Write the stage's deliverable into the run dir (and, for stage 1, the default path stage 2 reads)."""
    if cfg.stage.name == "vae":
        out = module.autoencoder.save_pretrained(run_dir / "export")
        target = Path(cfg.paths.autoencoder)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # a reader sees the old or the new export, never half of one
        _export_sd_layouts(ae_ckpt, module.autoencoder, out, "vae.safetensors")
        print(f"[ldm] autoencoder exported to {out} (also diffusers/ and vae.safetensors) and {target}")
    else:
        # diffusers and CompVis pipelines need a VAE: pixel-space models (identity) keep our own layout only.
        out = write_bundle(module, run_dir / "export", outside_layouts=cfg.model.autoencoder.get("kind") != "identity")
        print(f"[ldm] EMA UNet, autoencoder and settings exported to {out} (python sample.py ckpt={out}; "
              f"also diffusers/, sd.safetensors and compvis/)")


def optimizer_steps_per_rank(trainer: pl.Trainer, module: pl.LightningModule) -> list[list[int]] | None:
    """Every rank's count of steps per optimizer (modules that keep `optimizer_steps`): proof that ranks agree.

    Runs after `fit`, when Lightning has moved the module back to the CPU: the tensor goes on the strategy's
    root device (NCCL refuses CPU tensors), not on `module.device`.
    """
    counts = getattr(module, "optimizer_steps", None)
    if counts is None or trainer.interrupted:
        return None
    gathered = trainer.strategy.all_gather(torch.tensor(counts, device=trainer.strategy.root_device))
    return gathered.view(-1, len(counts)).cpu().tolist()


class _StartStep(pl.Callback):
    """The global step training started from (0, or the resumed checkpoint's): recorded in summary.json."""

    step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


class _EMABeforeCheckpoint(pl.Callback):
    """The step's EMA update before ModelCheckpoint saves (Lightning runs checkpoint callbacks last, and all
    callbacks before the module's own on_train_batch_end)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        update = getattr(pl_module, "update_ema", None)
        if update is not None:
            update()


class _LastValidation(pl.Callback):
    """The global step of the last full validation: when `fit` ended with one, it is not run again."""

    step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training stage; returns the final logged metrics."""
    start = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = run_directory()
    if cfg.get("offline"):  # before anything loads weights: fail here, naming every missing file
        use_offline_cache(cfg, _task_overrides())
    perf = OmegaConf.to_container(cfg.get("perf") or {}, resolve=True)
    check_perf(perf)
    resume = resolve_resume(cfg, run_dir)
    module = build_module(cfg)
    done = apply_backend_flags(perf) + apply_model_perf(module, perf)
    if done:
        print(f"[ldm] perf: {', '.join(done)}")
    ensure_shapes_data(cfg)
    data_args = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "name"}
    if data_args.get("latents") and cfg.stage.name == "ldm" and not data_args.get("autoencoder"):
        data_args["autoencoder"] = str(resolve_autoencoder_path(cfg))  # refuse shards another autoencoder made
    datamodule = build_datamodule(data_args)
    if data_args.get("latents"):
        try:
            datamodule.check_latent_shards()  # now, not inside fit: a wrong autoencoder is a bad setting
        except (ValueError, OSError) as err:
            raise ConfigError(f"data.train_shards / data.val_shards: {err}") from err
        if cfg.stage.name == "ldm":
            try:  # a text tower other than the one that made the stored embeddings: a bad setting too
                if attach_stored_text(module, datamodule):
                    print("[ldm] text: stored embeddings from the latent shards; the text tower does not run "
                          "in the training step (it is kept for validation sampling and exports)")
            except ValueError as err:
                raise ConfigError(str(err)) from err
    buckets = getattr(datamodule, "bucket_list", lambda: None)()
    if perf.get("compile") and buckets:
        print(f"[ldm] perf: {', '.join(compile_per_shape(len(buckets)))}")
    logger = make_logger(OmegaConf.to_container(cfg.logger, resolve=True), run_dir,
                         run_name=f"{cfg.stage.name}-{run_dir.name}", resume_from=resume)
    if logger is not None:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True),
                                "overrides": _task_overrides() or [], "resumed_from": resume})
    faults = cfg.get("faults") or {}
    start_step, last_validation = _StartStep(), _LastValidation()
    callbacks: list[pl.Callback] = [
        NonFiniteLossGuard(int(faults.get("max_consecutive_nonfinite", 5))),
        start_step,
        last_validation,
        _EMABeforeCheckpoint(),
        PreemptionCheckpoint(cfg.trainer.get("log_every_n_steps") or 50),  # SLURM's USR1: save, requeue, stop
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=cfg.checkpoint.save_last,
                        every_n_train_steps=cfg.checkpoint.every_n_train_steps, save_top_k=-1,
                        filename="step{step:07d}", auto_insert_metric_name=False),
    ]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(ThroughputMonitor(cfg.trainer.get("log_every_n_steps") or 50))
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("enable_progress_bar", True):
        # The bar reads the logged loss from the device at each refresh: refreshing with the loggers' reads keeps
        # the step free of extra host synchronisations (what perf.progress_bar_refresh_steps=null does).
        refresh = perf.get("progress_bar_refresh_steps") or trainer_args.get("log_every_n_steps") or 50
        callbacks.append(LossProgressBar(refresh_rate=int(refresh)))
    if not module.automatic_optimization:
        trainer_args.pop("gradient_clip_val", None)  # Lightning refuses it; the module clips (see build_module)
    timeout_s = faults.get("collective_timeout_s")
    # Manual optimization: each backward touches only one optimizer's parameters (autoencoder or discriminator).
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), timeout_s,
                                              find_unused_parameters=not module.automatic_optimization,
                                              devices=trainer_args.get("devices", 1),
                                              num_nodes=trainer_args.get("num_nodes", 1))
    trainer = pl.Trainer(**trainer_args, default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
                         logger=logger if logger is not None else False, callbacks=callbacks)
    own_signal_handlers(trainer)  # USR1/SIGTERM reach loader workers too (SLURM signals the whole step)
    pin_run_dir_for_children(run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from err
    except Exception as err:
        message = explain_collective_failure(err, trainer.global_rank, timeout_s) if trainer.world_size > 1 else None
        if message:
            print(f"error: {message}", file=sys.stderr)
        raise
    steps_per_rank = optimizer_steps_per_rank(trainer, module)
    if trainer.limit_val_batches and not trainer.interrupted and last_validation.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics for summary.json
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    exported = module_for_export(trainer, module)  # trainer=fsdp: the full state gathered (on every rank)
    if trainer.is_global_zero:
        export(exported, cfg, run_dir)
        elapsed = time.time() - start
        summary = {"stage": cfg.stage.name, "run_dir": str(run_dir), "wall_seconds": round(elapsed, 1),
                   "global_step": trainer.global_step, "metrics": metrics, "resumed_from": resume,
                   "start_step": start_step.step}
        if steps_per_rank is not None:
            summary["optimizer_steps_per_rank"] = steps_per_rank
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[ldm] stage={cfg.stage.name} finished in {elapsed:.0f} s; run dir {run_dir}")
    if logger is not None and hasattr(logger, "experiment") and cfg.logger.name == "wandb":
        import wandb

        wandb.finish()
    return metrics
