"""Stage 2 LightningModule: a UNet denoiser on frozen-autoencoder latents, conditioned on frozen text."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.autoencoder.distribution import DiagonalGaussian
from ldm.autoencoder.identity import build_autoencoder
from ldm.autoencoder.model import AutoencoderKL
from ldm.checkpoints.ema_snapshots import SNAPSHOT_DIR, carry_over, prune_after, snapshot_profiles
from ldm.conditioning import build_conditioner, rebuilt_from_name
from ldm.data.captions import pick_captions
from ldm.diffusion.ema import EMA
from ldm.diffusion.objectives import check_prediction_type, training_target
from ldm.diffusion.posthoc_ema import PosthocEMA
from ldm.diffusion.samplers import check_guidance_interval, check_sampler, classifier_free_guidance, sample
from ldm.diffusion.schedule import build_schedule
from ldm.diffusion.unet import UNetModel
from ldm.diffusion.val_loss import keyed_noise, quantile_timesteps
from ldm.diffusion.weighting import min_snr_weight
from ldm.metrics.generation import METRIC_SEED_OFFSET, GenerationMetrics, metric_seeds, sample_and_score
from ldm.train.faults import skip_nonfinite
from ldm.train.images import log_image, make_grid
from ldm.train.optim import adamw_with_warmup, check_decay_fraction, clip_gradients
from ldm.train.rng import step_generators

# A frozen published text tower is left out of checkpoints (see on_save_checkpoint); its fingerprint stays.
_TEXT_PREFIX, _TEXT_FINGERPRINT = "text_encoder.", "text_encoder_fingerprint"
_POSTHOC_PREFIX, _POSTHOC_LENGTHS = "posthoc_ema.", "posthoc_ema_sigma_rels"


def _fingerprint(tensors: dict[str, torch.Tensor]) -> list[float]:
    """(count, sum, sum of squares) over all tensors in float64: tells a rebuilt tower from another."""
    # One float64 tensor at a time (a 1.4 GB tower is not copied whole), one host read at the end.
    sums = [torch.stack([v.sum(), v.square().sum()]) for v in (t.detach().double() for t in tensors.values())]
    total = torch.stack(sums).sum(0).tolist() if sums else [0.0, 0.0]
    return [float(len(sums)), *total]


class LatentDiffusionModule(pl.LightningModule):
    def __init__(self, unet: dict[str, Any], text_encoder: dict[str, Any], autoencoder: dict[str, Any],
                 autoencoder_path: str | None = None, schedule: dict[str, Any] | None = None,
                 prediction_type: str = "epsilon", scale_factor: float | None = None,
                 cond_drop_prob: float = 0.1, snr_gamma: float | None = None, offset_noise: float = 0.0, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 text_encoder_lr: float | None = None, lr_decay_fraction: float = 0.0,
                 lr_decay_end: int | None = None, min_lr_factor: float = 0.0,
                 ema_decay: float = 0.9999, sampler: str = "ddim", num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_interval: list[float] | None = None, eta: float = 0.0,
                 val_prompts: list[str] | None = None,
                 val_seed: int = 0, score_shapes: bool = False, flow: dict[str, Any] | None = None,
                 seed: int = 0, metrics: dict[str, Any] | None = None, model_guidance: float = 0.0,
                 posthoc_ema: dict[str, Any] | None = None, val_loss_buckets: int = 5):
        super().__init__()
        check_prediction_type(prediction_type)
        check_sampler(sampler, prediction_type)
        check_guidance_interval(guidance_interval)
        check_decay_fraction(lr_decay_fraction, lr_decay_end, min_lr_factor)
        if not 0.0 <= model_guidance < 1.0:
            raise ValueError(f"stage.module.model_guidance must be in [0, 1), got {model_guidance}: the trained "
                             "guidance is w / (1 - w) times the learned one, which has no fixed point at w >= 1")
        # autoencoder_path only matters when training starts; a checkpoint carries the weights itself.
        self.save_hyperparameters(ignore=["autoencoder_path"])
        self.autoencoder = build_autoencoder(autoencoder)  # AutoencoderKL, or the identity (pixel space)
        if autoencoder_path:
            self.autoencoder.load_state_dict(AutoencoderKL.from_pretrained(autoencoder_path).state_dict())
        self.autoencoder.requires_grad_(False).eval()
        # OpenCLIP text (frozen by default), a learned class embedding, or nothing (see ldm.conditioning).
        self.text_encoder = build_conditioner(text_encoder)
        arch = {k: v for k, v in unet.items() if k != "init_from"}  # model.unet.init_from: loaded by ldm.train
        arch["in_channels"] = arch.get("in_channels") or self.autoencoder.latent_channels
        arch["out_channels"] = arch.get("out_channels") or self.autoencoder.latent_channels
        arch["context_dim"] = arch.get("context_dim") or self.text_encoder.output_dim
        if arch.get("pooled_context") and not arch["context_dim"]:
            arch["pooled_context"] = False  # an unconditional model has no prompt to pool (the shapes recipe sets it)
        self.unet = UNetModel(**arch)
        self.ema = EMA(self.unet, decay=ema_decay)
        # A trainable conditioner (class embeddings, an unfrozen text tower) is averaged like the UNet.
        self.conditioner_trains = any(p.requires_grad for p in self.text_encoder.parameters())
        self.text_encoder_ema = EMA(self.text_encoder, decay=ema_decay) if self.conditioner_trains else None
        self._ema_step: int | None = None  # the global step the EMA last averaged (see on_train_batch_end)
        self.posthoc_ema, self.snapshot_every = self._build_posthoc_ema(posthoc_ema)
        self._snapshot_step: int | None = None  # the global step of the last snapshots written
        self.schedule = build_schedule(prediction_type, schedule, flow)
        self._val_timesteps, self._val_bucket_names = quantile_timesteps(self.schedule, val_loss_buckets)
        # <= 0 means "not yet estimated": set from the first batch (the paper's scale_by_std).
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor or -1.0)))
        self._scale_factor_checked = False
        metrics = dict(metrics or {})
        self.num_metric_samples = int(metrics.pop("num_samples", 0))
        # Frozen scoring networks: rebuilt from the config, never stored in checkpoints (see on_save_checkpoint).
        self.val_metrics = GenerationMetrics(**metrics) if self.num_metric_samples > 0 else None
        self._metric_images: list[torch.Tensor] = []
        self._metric_prompts: list[str] = []
        # Stored text embeddings (data.text_embeddings): the shards' empty prompt, set by use_stored_text.
        self.register_buffer("stored_empty_context", None, persistent=False)

    # ------------------------------------------------------------------ helpers
    def use_stored_text(self, empty_context: torch.Tensor) -> None:
        """Train from batch["context"] (embeddings stored with the latents): the tower never runs in a training
        or validation step; caption dropout and the unconditional branch use the stored empty prompt. The tower
        is still built: validation sampling, FID/CLIP metrics, exports and sample.py encode new prompts."""
        if self.conditioner_trains:
            raise ValueError("stored text embeddings need a frozen text tower (model.text_encoder.freeze=true)")
        # A buffer (it moves with the module), not persistent: checkpoints are those of a run that encodes text.
        self.stored_empty_context = empty_context.float().to(self.device)

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What perf.compile compiles: the trained UNet. The EMA copy samples at validation only, and the frozen
        autoencoder and text encoder run once per batch, so they stay eager."""
        return {"unet": self.unet}

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen parts never switch to training behaviour
        self.text_encoder.train(mode)
        return self

    def _autoencoder_fp32(self) -> contextlib.AbstractContextManager:
        """Under 16-mixed the frozen autoencoder runs in float32: SD-style VAEs overflow float16
        (bench/fp16_overflow.py). bf16 has float32's range and keeps autocast."""
        kind = self.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
            return torch.autocast(kind, enabled=False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def posterior(self, batch: dict) -> DiagonalGaussian:
        """The autoencoder's posterior for a batch: from its images, or from precomputed moments
        (data.latents=true, shards from `python -m ldm.data.latents`), where the encoder never runs."""
        if "moments" in batch:
            return DiagonalGaussian(batch["moments"].float())
        with self._autoencoder_fp32():
            return self.autoencoder.encode(batch["image"].float())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self._autoencoder_fp32():
            return self.autoencoder.decode(latents.float() / self.scale_factor).clamp(-1, 1)

    def encode_text(self, captions: list[str], use_ema: bool = False) -> torch.Tensor | None:
        encoder = self.text_encoder_ema.model if use_ema and self.text_encoder_ema is not None else self.text_encoder
        with torch.set_grad_enabled(self.conditioner_trains and encoder.training and torch.is_grad_enabled()):
            return encoder(captions)

    def step_generators(self, step: int) -> tuple[torch.Generator, torch.Generator]:
        """(CPU, device) generators seeded by (seed, step, rank): the noise, timesteps, posterior sample and
        caption dropout of a step are a function of those alone, so a resumed run draws what an uninterrupted
        one would have drawn."""
        return step_generators(self.hparams.seed, step, self.global_rank, self.device)

    def _ensure_scale_factor(self, batch: dict) -> None:
        """Estimate scale_factor on the first batch when unset. Checked on the device once per process, not
        every step: reading a CUDA buffer waits for all queued work."""
        if not self._scale_factor_checked:
            if float(self.scale_factor) <= 0:
                self._estimate_scale_factor(batch)
            self._scale_factor_checked = True

    @torch.no_grad()
    def _estimate_scale_factor(self, batch: dict) -> None:
        z = self.posterior(batch).sample(self.step_generators(-1)[1])
        std = z.float().std()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(std)
            std /= torch.distributed.get_world_size()
        self.scale_factor.fill_(1.0 / float(std))
        print(f"[ldm] scale_factor estimated from the first batch: {float(self.scale_factor):.5f}")

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        """The one-time host reads (is scale_factor set, the EMA update counts) before the loop, not in a step."""
        if not self._scale_factor_checked and float(self.scale_factor) > 0:
            self._scale_factor_checked = True
        for ema in (self.ema, self.text_encoder_ema):
            if ema is not None:
                ema.current_decay()
        self._ema_step = self.trainer.global_step  # 0, or the resumed checkpoint's step (once per optimizer step)
        self._start_snapshots()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._ensure_scale_factor(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        captions, context = pick_captions(batch, self.hparams.seed, self.global_step, self.global_rank)
        loss, per_sample = self.diffusion_loss(self.posterior(batch), captions, self.global_step, context)
        skip_nonfinite(self, loss)  # non-finite on any rank: every rank drops this step's update (ldm.train.faults)
        self.log("train/loss", loss, batch_size=per_sample.shape[0])  # shown by ldm.train.progress, not prog_bar
        self.log("train/mse", per_sample.mean().detach(), batch_size=per_sample.shape[0])
        return loss

    def _stored_empty(self) -> torch.Tensor:
        if self.stored_empty_context is None:
            raise RuntimeError("the batch holds stored text embeddings but the module has no stored empty prompt: "
                               "call use_stored_text(datamodule.empty_context) before fit (ldm.train does)")
        return self.stored_empty_context

    def diffusion_loss(self, posterior: DiagonalGaussian, captions: list[str], step: int,
                       context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted training loss of one batch and its per-sample error; every random draw (caption
        dropout, posterior sample, timesteps, noise) comes from the generators of `step`.

        `context`: the captions' stored embeddings (B x T x D); then the text tower does not run."""
        cpu_gen, gen = self.step_generators(step)
        drop = torch.rand(len(captions), generator=cpu_gen) < self.hparams.cond_drop_prob
        z0 = posterior.sample(gen) * self.scale_factor
        if context is None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            context = self.encode_text(captions)
        else:  # the dropped rows become the stored empty prompt
            empty = self._stored_empty().to(context.dtype)
            context = torch.where(drop.to(context.device).view(-1, 1, 1), empty, context)
        t = self.schedule.sample_timesteps(z0.shape[0], z0.device, generator=gen)
        noise = torch.randn(z0.shape, generator=gen, device=z0.device, dtype=z0.dtype)
        if self.hparams.offset_noise:  # a per-channel constant lets the model change overall brightness
            noise = noise + self.hparams.offset_noise * torch.randn(*z0.shape[:2], 1, 1, generator=gen,
                                                                    device=z0.device, dtype=z0.dtype)
        guide = None
        if self.hparams.get("model_guidance") and context is not None:
            keep = (~drop).to(device=z0.device, dtype=torch.float32).view(-1, 1, 1, 1)
            with torch.no_grad():
                uncond = (self._stored_empty()[None] if self.stored_empty_context is not None
                          else self.encode_text([""])).expand(len(captions), -1, -1)
            guide = (self.hparams.model_guidance * keep, uncond)
        per_sample, snr = self.denoising_error(self.unet, z0, noise, t, context, guide)
        loss = (min_snr_weight(snr, self.hparams.snr_gamma, self.hparams.prediction_type) * per_sample).mean()
        return loss, per_sample

    def denoising_error(self, unet: torch.nn.Module, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        context: torch.Tensor, guide: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample squared error of `unet` against the objective's target at timesteps t, and the SNR.

        guide = (w, unconditional context): model guidance (Tang et al. 2025), the target moved by w times the
        network's own, gradient-free conditional-minus-unconditional output, so the prompt's effect is learned
        amplified instead of waiting for sampling-time guidance to amplify it."""
        alpha, sigma = self.schedule.coefficients(t, z0.ndim)
        x_t, model_t = self.schedule.add_noise(z0, noise, t), self.schedule.model_time(t)
        out = unet(x_t, model_t, context)
        target = training_target(self.hparams.prediction_type, z0, noise, alpha, sigma)
        if guide is not None:
            weight, uncond = guide
            with torch.no_grad():
                out_u = unet(x_t, model_t, uncond)
            target = target.float() + weight * (out.detach().float() - out_u.float())
        per_sample = (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        return per_sample, (alpha / sigma).flatten().float() ** 2

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        self.update_ema()

    def update_ema(self) -> None:
        """Average this optimizer step's weights into the EMA copies, once, whoever calls first.

        Lightning runs callbacks' on_train_batch_end before the module's, and ModelCheckpoint last among
        callbacks: ldm.train.cli adds a callback that calls this before ModelCheckpoint, so a periodic checkpoint
        holds this step's average (else a resume from it would lose one EMA update for good).
        """
        # Once per optimizer step, not per micro-batch: with accumulate_grad_batches=k the decay stays d (not d^k)
        # and the EMA warm-up counts optimizer steps. global_step counts them (a host int, no device read).
        step = self._trainer.global_step if self._trainer is not None else None  # None: called by hand
        if step is not None and step == self._ema_step:
            return  # inside an accumulation window: the weights have not changed
        self._ema_step = step
        self.ema.update(self.unet)
        if self.text_encoder_ema is not None:
            self.text_encoder_ema.update(self.text_encoder)
        self.log("train/ema_decay", self.ema.decay_tensor(), batch_size=1)  # a device tensor: no copy per step
        if self.posthoc_ema is not None:
            self.posthoc_ema.update(self._posthoc_sources())
            if step is not None and step % self.snapshot_every == 0:
                self._write_snapshots(step)

    # ------------------------------------------------------------------ post-hoc EMA (ldm.diffusion.posthoc_ema)
    _POSTHOC_KEYS = frozenset({"sigma_rels", "snapshot_every", "track"})

    def _build_posthoc_ema(self, config: dict[str, Any] | None) -> tuple[PosthocEMA | None, int]:
        config = dict(config or {})
        unknown = sorted(set(config) - self._POSTHOC_KEYS)
        if unknown:
            raise ValueError(f"model.posthoc_ema: unknown keys {unknown}; known: {sorted(self._POSTHOC_KEYS)}")
        sigma_rels = [float(s) for s in config.get("sigma_rels") or []]
        track = [float(s) for s in config.get("track") or []]
        if not sigma_rels:
            if track:
                raise ValueError("model.posthoc_ema.track needs model.posthoc_ema.sigma_rels: tracked profiles "
                                 "check reconstructions from the snapshotted ones")
            return None, 0
        every = config.get("snapshot_every")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"model.posthoc_ema.snapshot_every must be a positive number of steps, got {every!r}")
        try:
            return PosthocEMA(self._posthoc_sources(), sigma_rels, track), every
        except ValueError as err:
            raise ValueError(f"model.posthoc_ema.sigma_rels / track: {err}") from None

    def _posthoc_sources(self) -> dict[str, torch.nn.Module]:
        """What the profiles average: the UNet, and a trained conditioner (it is sampled with the UNet)."""
        return {"unet": self.unet, **({"text_encoder": self.text_encoder} if self.conditioner_trains else {})}

    def _snapshot_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / SNAPSHOT_DIR

    def _write_snapshots(self, step: int) -> None:
        """Rank 0 writes (every rank holds the same profiles); the reads to the host happen only here."""
        if self.global_rank == 0:
            snapshot_profiles(self._snapshot_dir(), self.posthoc_ema, step)
        self._snapshot_step = step

    def _start_snapshots(self) -> None:
        """At the start of fit: a resumed run keeps the snapshots its profiles descend from and no others."""
        if self.posthoc_ema is None:
            return
        from pytorch_lightning.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("model.posthoc_ema is not supported with trainer=fsdp (the profiles would need the "
                             "UNet's sharding); use trainer=ddp or turn it off (model.posthoc_ema.sigma_rels=[])")
        self._snapshot_step = None
        for profile in (*self.posthoc_ema.profiles, *self.posthoc_ema.tracked):
            profile.updates()  # the one host read of the update counts, before the loop (as for the EMA)
        if self.global_rank != 0:
            return
        step, folder = self.trainer.global_step, self._snapshot_dir()
        removed = prune_after(folder, step)
        ckpt = self.trainer.ckpt_path
        copied = []
        if ckpt:
            ckpt = Path(ckpt)
            source_run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            copied = carry_over(source_run / SNAPSHOT_DIR, folder, step)
        if removed or copied:
            print(f"[ldm] post-hoc EMA: resumed at step {step}: {len(copied)} snapshots carried over from "
                  f"{source_run / SNAPSHOT_DIR}, {len(removed)} written after step {step} removed")

    def on_train_end(self) -> None:
        """The last step's profiles, so a reconstruction can target where training ended."""
        if self.posthoc_ema is not None and self._snapshot_step != self.trainer.global_step:
            self._write_snapshots(self.trainer.global_step)

    def configure_optimizers(self) -> dict:
        unet = list(self.unet.parameters())
        text = [p for p in self.text_encoder.parameters() if p.requires_grad] if self.conditioner_trains else []
        text_lr = self.hparams.get("text_encoder_lr")
        # One group unless the conditioner has its own lr: checkpoints of either layout keep resuming.
        groups = ([{"params": unet}, {"params": text, "lr": text_lr}] if text and text_lr
                  else [{"params": unet + text}])
        hp = self.hparams
        start, end = self._lr_decay_window()
        # GradScaler (16-mixed) cannot unscale for fused AdamW, and clipping needs unscaled gradients.
        trainer = self._trainer
        fused = False if (trainer is not None and trainer.gradient_clip_val
                          and str(trainer.precision).startswith("16")) else None
        return adamw_with_warmup(groups, hp.lr, hp.warmup_steps, weight_decay=hp.weight_decay, fused=fused,
                                 decay_start=start, decay_end=end, min_lr_factor=hp.get("min_lr_factor", 0.0))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if gradient_clip_val:  # trainer.gradient_clip_val; fused AdamW under bf16-mixed too (ldm.train.optim)
            clip_gradients(self, optimizer, float(gradient_clip_val), gradient_clip_algorithm or "norm")

    def _lr_decay_window(self) -> tuple[int | None, int | None]:
        """The steps over which the lr decays: the last lr_decay_fraction of lr_decay_end (default max_steps)."""
        fraction = float(self.hparams.get("lr_decay_fraction") or 0.0)
        if fraction == 0.0:
            return None, None
        end = self.hparams.get("lr_decay_end")
        if end is None:
            trainer = self._trainer
            end = trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else None
        if end is None:
            raise ValueError("stage.module.lr_decay_fraction needs a step budget: set trainer.max_steps "
                             "(or stage.module.lr_decay_end)")
        end = int(end)
        return min(end - 1, round(end * (1.0 - fraction))), end

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str = "", sampler: str | None = None,
                 use_ema: bool = True, progress: bool = False, seeds: list[int] | None = None,
                 height: int | None = None, width: int | None = None,
                 guidance_interval: list[float] | None = None) -> torch.Tensor:
        """Prompts -> images in [-1, 1]. Sample i uses seeds[i] (default seed + i): same seed, same image.

        guidance_interval None is the model's own (hparams); [0, 1] guides at every step.

        height and width default to the autoencoder's training resolution; they must be multiples of its
        downsampling factor.
        """
        unet = self.ema.model if use_ema else self.unet
        steps = num_inference_steps or self.hparams.num_inference_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        f = self.autoencoder.downsample_factor
        height = height or self.autoencoder.config["resolution"]
        width = width or self.autoencoder.config["resolution"]
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the autoencoder's factor {f}, "
                             f"got {height}x{width}")
        shape = (self.autoencoder.latent_channels, height // f, width // f)
        seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
        # One generator per sample, kept for the stochastic samplers' fresh noise: same seed, same image.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        x = noise.to(self.device)
        cond = self.encode_text(prompts, use_ema=use_ema)
        uncond = self.encode_text([negative_prompt] * len(prompts), use_ema=use_ema)
        interval = self.hparams.get("guidance_interval") if guidance_interval is None else guidance_interval
        time_scale = getattr(self.schedule, "time_scale", None) or self.schedule.num_train_timesteps
        model_fn = classifier_free_guidance(unet, cond, uncond, scale, interval=interval, time_scale=time_scale)
        with self._sampling_precision():
            z = sample(sampler or self.hparams.sampler, model_fn, x, self.schedule, steps=steps,
                       eta=self.hparams.eta, prediction_type=self.hparams.prediction_type, progress=progress,
                       generator=generators)
        with self._sampling_precision(decoder=True):
            return self.decode_latents(z).float()  # images in float32 whatever the sampling precision

    def _sampling_precision(self, decoder: bool = False) -> contextlib.AbstractContextManager:
        """The trainer's precision for sampling: Lightning's epoch-end hooks (validation sampling, FID) run outside
        its autocast, so a bf16 run would sample in float32. The decoder keeps float32 under float16 autocast,
        as stage 1's fp16_upcast does (SD-style VAEs overflow fp16). No trainer (sample.py): unchanged."""
        trainer = self._trainer
        if trainer is None:
            return contextlib.nullcontext()
        if decoder and str(trainer.precision).startswith("16"):
            return torch.autocast(self.device.type, enabled=False)
        return trainer.precision_plugin.forward_context()

    # ------------------------------------------------------------------ validation
    def _metric_share(self, rank: int) -> int:
        """A rank's part of metrics.num_samples (the first ranks take the remainder)."""
        world = self.trainer.world_size
        return self.num_metric_samples // world + (rank < self.num_metric_samples % world)

    def on_validation_epoch_start(self) -> None:
        self._metric_images, self._metric_prompts = [], []
        self._val_sums = torch.zeros(len(self._val_timesteps), dtype=torch.float32, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float32, device=self.device)

    def _log_val_loss(self) -> None:
        """val/loss and val/loss_by_t/<bucket>: per-bucket sums and the sample count, summed over ranks on the
        root device in float32, then divided: the mean over every validation sample, whatever the world size."""
        strategy = self.trainer.strategy
        totals = torch.cat([self._val_sums, self._val_count.view(1)]).to(strategy.root_device)
        totals = strategy.reduce(totals, reduce_op="sum")
        by_t = totals[:-1] / totals[-1].clamp(min=1.0)
        self.log("val/loss", by_t.mean(), batch_size=1)
        self.log_dict({f"val/loss_by_t/{name}": by_t[k] for k, name in enumerate(self._val_bucket_names)},
                      batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        captions = list(batch["caption"])
        self._ensure_scale_factor(batch)
        post = self.posterior(batch)
        if self.val_metrics is not None:  # the first validation images and their captions: a fixed set per run
            room = self._metric_share(self.global_rank) - len(self._metric_prompts)
            if room > 0:
                self._metric_prompts += captions[:room]
                if not self.val_metrics.has_real:  # latent shards: the real images are the decoded means
                    with self._autoencoder_fp32():
                        real = batch["image"] if "image" in batch else self.autoencoder.decode(post.mode()).clamp(-1, 1)
                    self._metric_images.append(real[:room])
        z0 = post.mode() * self.scale_factor  # deterministic, like the noise and timesteps below
        if "context" in batch:  # stored embeddings (a frozen tower: no EMA copy); a sample's first caption
            context = batch["context"]
            context = (context[:, 0] if context.ndim == 4 else context).float()
        else:
            context = self.encode_text(captions, use_ema=True)
        # Every sample at every bucket's timestep, with noise from its key (ldm.diffusion.val_loss): sums and a
        # count per rank, reduced once at the epoch's end, so the value depends on the weights and data alone.
        n = z0.shape[0]
        keys = list(batch.get("key") or [f"{batch_idx}:{i}" for i in range(n)])
        noise = keyed_noise(keys, tuple(z0.shape[1:]), self.hparams.val_seed).to(z0)
        for k, t in enumerate(self._val_timesteps.to(z0.device)):
            per_sample, _ = self.denoising_error(self.ema.model, z0, noise, t.expand(n), context)
            self._val_sums[k] += per_sample.sum()
        self._val_count += n

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._log_val_loss()
        if self.val_metrics is not None:
            self._log_generation_metrics()
        prompts = self.hparams.val_prompts
        if not prompts:
            return
        # Each rank samples its share of the fixed prompt list; metrics are averaged over ranks.
        world = self.trainer.world_size
        mine = prompts[self.global_rank::world]
        seeds = list(range(self.hparams.val_seed, self.hparams.val_seed + len(prompts)))[self.global_rank::world]
        # Equal shares: a rank short of prompts (more ranks than prompts) pads with the first prompt and drops
        # those images, so every rank runs the same sampling and reaches the same collectives.
        pad = -(-len(prompts) // world) - len(mine)
        padded = self.generate(mine + prompts[:1] * pad, seeds=seeds + [self.hparams.val_seed] * pad)
        images = padded[:len(mine)]
        if self.hparams.score_shapes:
            from ldm.data.analyze import prompt_accuracy

            n = len(mine)  # 0 on a rank with only padding: its values weigh nothing in the sum over ranks
            acc = prompt_accuracy(images.cpu(), mine) if n else prompt_accuracy(padded.cpu(), prompts[:1] * pad)
            # Hits and counts summed over ranks: the accuracy over all prompts. (Lightning's sync_dist mean
            # weighted by batch_size divides an integer count by the world size and truncates it.)
            keys = list(acc)
            hits = torch.tensor([acc[k] * n for k in keys] + [n], dtype=torch.float32,
                                device=self.trainer.strategy.root_device)
            hits = self.trainer.strategy.reduce(hits, reduce_op="sum")
            self.log_dict({f"val/prompt_accuracy/{k}": hits[i] / hits[-1] for i, k in enumerate(keys)},
                          batch_size=1)
        if self.global_rank == 0:
            k = min(len(mine), 16)
            log_image(self.logger, "val/samples", make_grid(images[:k], nrow=4), self.global_step,
                      caption=" | ".join(mine[:k]))

    def _log_generation_metrics(self) -> None:
        """FID and CLIP score of EMA samples for the fixed validation captions; every rank does its share."""
        metrics = self.val_metrics
        if not metrics.has_real:
            for images in self._metric_images:
                metrics.update_real(images)
            metrics.has_real = True
        prompts = self._metric_prompts
        first = sum(self._metric_share(r) for r in range(self.global_rank))
        batch = max(1, self.trainer.datamodule.val_batch_size if self.trainer.datamodule is not None else 16)
        seeds = metric_seeds(self.hparams.val_seed + METRIC_SEED_OFFSET, first, len(prompts))
        sample_and_score(lambda p, s: self.generate(p, seeds=s), metrics, prompts, seeds, batch)  # = ldm.evaluate's
        values = metrics.compute()  # synchronizes the metric states across ranks
        metrics.reset()
        self.log_dict({f"val/{k}": float(v) for k, v in values.items()}, rank_zero_only=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        if self.posthoc_ema is not None:  # which length each saved profile is: a resume must not relabel them
            checkpoint[_POSTHOC_LENGTHS] = self._posthoc_lengths()
        for key in [k for k in state if k.startswith("val_metrics.")]:
            del state[key]
        if rebuilt_from_name(self.hparams.text_encoder):  # a frozen published tower: rebuilt on load
            tower = {k: state.pop(k) for k in [k for k in state if k.startswith(_TEXT_PREFIX)]}
            checkpoint[_TEXT_FINGERPRINT] = _fingerprint(tower)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._scale_factor_checked = False  # the checkpoint's scale_factor replaces whatever was checked
        state = checkpoint["state_dict"]
        self._load_posthoc_state(checkpoint)
        if _TEXT_FINGERPRINT in checkpoint:  # saved without the frozen tower: this module rebuilt it
            tower = {k: v for k, v in self.state_dict().items() if k.startswith(_TEXT_PREFIX)}
            want, got = checkpoint[_TEXT_FINGERPRINT], _fingerprint(tower)
            if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(want, got, strict=True)):
                raise ValueError(f"the text tower built from model.text_encoder={dict(self.hparams.text_encoder)} "
                                 f"is not the one this checkpoint was trained with (weights fingerprint {got}, "
                                 f"saved {want})")
            state.update(tower)
        for key, value in self.state_dict().items():
            if key.startswith("val_metrics."):
                state.setdefault(key, value)

    def _posthoc_lengths(self) -> dict[str, list[float]]:
        return {"sigma_rels": [p.sigma_rel for p in self.posthoc_ema.profiles],
                "track": [p.sigma_rel for p in self.posthoc_ema.tracked]}

    def _load_posthoc_state(self, checkpoint: dict) -> None:
        """Profiles in a checkpoint load into profiles of the same lengths; a module without profiles (sampling,
        export) drops them; profiles turned on at a resume start from there (their t counts from the resume)."""
        state = checkpoint["state_dict"]
        if self.posthoc_ema is None:
            for key in [k for k in state if k.startswith(_POSTHOC_PREFIX)]:
                del state[key]
            return
        saved = checkpoint.get(_POSTHOC_LENGTHS)
        if saved is not None and saved != self._posthoc_lengths():
            raise ValueError(f"model.posthoc_ema: this checkpoint's profiles are {saved}, the config asks for "
                             f"{self._posthoc_lengths()}; resume with the same sigma_rels and track")
        for key, value in self.state_dict().items():
            if key.startswith(_POSTHOC_PREFIX):
                state.setdefault(key, value)
