"""Stage 1 LightningModule: the autoencoder and its patch-GAN discriminator, trained with manual optimization.

One batch = one autoencoder step, then (after `disc_start`) one discriminator step. Only the autoencoder's
step counts towards `trainer.global_step`, so `max_steps`, `val_check_interval` and `disc_start` all mean
autoencoder updates (Lightning otherwise counts every optimizer's step, Lightning issue #17958).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.autoencoder.loss import VAELoss
from ldm.autoencoder.model import AutoencoderKL
from ldm.metrics.reconstruction import ReconstructionMetrics
from ldm.train.faults import skip_nonfinite
from ldm.train.images import log_image, make_grid
from ldm.train.optim import adamw_with_warmup, clip_gradients
from ldm.train.rng import step_generators

# Frozen networks rebuilt from their own weights (LPIPS's VGG, FID's Inception): kept out of checkpoints.
_FROZEN_PREFIXES = ("loss.lpips.", "val_metrics.")


@contextlib.contextmanager
def _uncounted(optimizer: Any) -> Iterator[None]:
    """Step a LightningOptimizer without advancing the trainer's step counter."""
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


class AutoencoderModule(pl.LightningModule):
    def __init__(self, autoencoder: dict[str, Any], loss: dict[str, Any] | None = None, lr: float = 4.5e-6,
                 disc_lr: float | None = None, betas: tuple[float, float] = (0.5, 0.9), warmup_steps: int = 0,
                 grad_clip: float | None = None, image_log_every: int = 500, num_log_images: int = 16,
                 metrics: dict[str, Any] | None = None, fp16_upcast: bool = True, score_shapes: bool = False,
                 seed: int = 0, equivariance_weight: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        arch = dict(autoencoder)
        init_from = arch.pop("init_from", None)
        self.autoencoder = AutoencoderKL.from_pretrained(init_from, **arch) if init_from else AutoencoderKL(**arch)
        self.loss = VAELoss(**(loss or {}))
        metrics = dict(metrics or {})
        self.val_metrics = ReconstructionMetrics(fid=metrics.get("fid"), lpips=self.loss.lpips,
                                                 lpips_pretrained=(loss or {}).get("lpips_pretrained", False),
                                                 lpips_weights_path=(loss or {}).get("lpips_weights_path"))
        # Steps taken by (autoencoder, discriminator) on this rank; a plain list, not a buffer, because DDP would
        # overwrite buffers with rank 0's. Saved in checkpoints; train() reports every rank's in summary.json.
        self.optimizer_steps = [0, 0]

    # ------------------------------------------------------------------ forward
    def _fp16_guard(self) -> contextlib.AbstractContextManager:
        """Under 16-mixed, run the autoencoder in float32: SD-style VAEs overflow fp16 (see bench/fp16_overflow.py)."""
        if self.hparams.fp16_upcast and torch.is_autocast_enabled(self.device.type) and \
                torch.get_autocast_dtype(self.device.type) == torch.float16:
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    def reconstruct(self, x: torch.Tensor, sample_posterior: bool = True,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        with self._fp16_guard():
            return self.autoencoder(x.float() if self.hparams.fp16_upcast else x, sample_posterior=sample_posterior,
                                    generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, sample_posterior=False)[0]

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What perf.compile compiles: encoder and decoder, not the posterior sampling between them (it takes a
        torch.Generator, which would split the graph)."""
        return {"encoder": self.autoencoder.encoder, "decoder": self.autoencoder.decoder}

    compile_retains_graph = True  # the adaptive GAN weight runs the decoder's backward more than once per step

    def _grad_scale(self) -> torch.Tensor | float:
        scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None)
        scale = getattr(scaler, "_scale", None)
        return scale if scale is not None else 1.0

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        step = self.global_step
        opt_ae, opt_disc = self.optimizers()
        sched_ae, sched_disc = self.lr_schedulers()

        self.toggle_optimizer(opt_ae)  # discriminator frozen: its weights get no gradient from the generator loss
        # The posterior sample is drawn from a generator seeded by (seed, step, rank): a resumed run draws the same.
        generator = step_generators(self.hparams.seed, step, self.global_rank, self.device)[1]
        recon, posterior = self.reconstruct(x, generator=generator)
        g_loss, logs = self.loss.generator(x, recon, posterior, step, self.autoencoder.last_layer_weight(),
                                           self._grad_scale())
        if self.hparams.get("equivariance_weight"):
            eq = self.equivariance_loss(x, posterior, step)
            g_loss = g_loss + self.hparams.equivariance_weight * eq
            logs["equivariance_l1"] = eq.detach()
        if skip_nonfinite(self, g_loss):  # no optimizer steps this batch, on any rank (see ldm.train.faults)
            self.untoggle_optimizer(opt_ae)
            return
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_ae.step()
        sched_ae.step()
        self.untoggle_optimizer(opt_ae)
        self.optimizer_steps[0] += 1

        if self.loss.disc_active(step):
            self.toggle_optimizer(opt_disc)
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            with _uncounted(opt_disc):
                opt_disc.step()
            sched_disc.step()
            self.untoggle_optimizer(opt_disc)
            self.optimizer_steps[1] += 1
            logs.update(d_logs)

        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=x.shape[0])
        self.log("loss", logs["loss"], logger=False, batch_size=x.shape[0])  # shown by ldm.train.progress
        every = self.hparams.image_log_every
        if self.global_rank == 0 and every and step % every == 0:
            self._log_reconstructions(x, recon, "train/reconstructions")

    def equivariance_loss(self, x: torch.Tensor, posterior: Any, step: int) -> torch.Tensor:
        """L1 of decode(T z) against T x, T = 2x downscale then a quarter turn (EQ-VAE, Kouzelis et al. 2025).

        Without it the encoder is free to write a shape as an arbitrary texture of latent values that only the
        decoder can read; a latent that must also decode when averaged and turned keeps image-like, smooth
        codes (on shapes: a higher PSNR, and a few more shapes from stage 2; docs/results.md).
        """
        k = step % 4  # which quarter turn: from the step, so a resumed run draws the same
        z = torch.rot90(F.avg_pool2d(posterior.mode(), 2), k, dims=(2, 3))
        target = torch.rot90(F.avg_pool2d(x.float(), 2), k, dims=(2, 3))
        with self._fp16_guard():
            recon = self.autoencoder.decode(z.float() if self.hparams.fp16_upcast else z)
        # Per pixel, then summed over the full-size image and averaged over the batch: the scale of the
        # reconstruction term (an L1 sum per sample), so weight 1 weighs both alike.
        return (recon.float() - target).abs().mean(dim=(1, 2, 3)).mean() * x[0].numel()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after AMP unscaling, so the clip threshold is in true gradient units.
        if self.hparams.grad_clip:
            clip_gradients(self, optimizer, self.hparams.grad_clip)  # fused AdamW under bf16-mixed too

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        recon, posterior = self.reconstruct(x, sample_posterior=False)
        _, _, logs = self.loss.reconstruction(x, recon, posterior)
        self.val_metrics.update(x, recon)
        metrics = {"val/l1": logs["l1"], "val/kl": logs["kl"]}
        if self.hparams.score_shapes:  # built-in data: do reconstructions keep colours and shape type?
            from ldm.data.analyze import prompt_accuracy

            acc = prompt_accuracy(recon.detach().float().cpu(), list(batch["caption"]))
            metrics.update({f"val/recon_accuracy/{k}": torch.tensor(v) for k, v in acc.items()})
        self.log_dict(metrics, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.global_rank == 0:
            self._log_reconstructions(x, recon, "val/reconstructions")

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # torchmetrics syncs the states across ranks here
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        self.val_metrics.reset()

    def _log_reconstructions(self, x: torch.Tensor, recon: torch.Tensor, key: str) -> None:
        n = self.hparams.num_log_images
        grid = make_grid(torch.cat([x[:n], recon[:n].detach()]), nrow=min(n, x.shape[0]))
        log_image(self.logger, key, grid, self.global_step, caption="top: inputs, bottom: reconstructions")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["optimizer_steps"] = list(self.optimizer_steps)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.optimizer_steps = list(checkpoint.get("optimizer_steps", self.optimizer_steps))
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(_FROZEN_PREFIXES):
                state.setdefault(key, value)

    def configure_optimizers(self) -> list[dict]:
        hp = self.hparams
        # GradScaler cannot unscale for fused AdamW, and clipping needs unscaled gradients.
        fused = None if not (hp.grad_clip and self.trainer is not None and
                             str(self.trainer.precision).startswith("16")) else False
        ae_params = list(self.autoencoder.parameters()) + [self.loss.logvar]
        ae = adamw_with_warmup(ae_params, hp.lr, hp.warmup_steps, hp.betas, fused=fused, name="lr/autoencoder")
        disc = adamw_with_warmup(self.loss.discriminator.parameters(), hp.disc_lr or hp.lr, hp.warmup_steps,
                                 hp.betas, fused=fused, name="lr/discriminator")
        return [ae, disc]
