"""Stage 1 LightningModule: trains AutoencoderKL with the VAE loss; logs reconstructions."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ldm.autoencoder.loss import VAELoss
from ldm.autoencoder.model import AutoencoderKL
from ldm.train.images import log_image, make_grid
from ldm.train.optim import adamw_with_warmup


class AutoencoderModule(pl.LightningModule):
    def __init__(self, autoencoder: dict[str, Any], loss: dict[str, Any] | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.5, 0.9), warmup_steps: int = 0, image_log_every: int = 500,
                 num_log_images: int = 16, score_shapes: bool = False):
        super().__init__()
        self.save_hyperparameters()
        arch = dict(autoencoder)
        init_from = arch.pop("init_from", None)
        if init_from:
            self.autoencoder = AutoencoderKL.from_pretrained(init_from)
        else:
            self.autoencoder = AutoencoderKL(**arch)
        self.loss = VAELoss(**(loss or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x, sample_posterior=False)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        recon, posterior = self.autoencoder(x)
        loss, logs = self.loss(x, recon, posterior)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=x.shape[0])
        self.log("loss", logs["loss"], prog_bar=True, logger=False, batch_size=x.shape[0])
        if self.global_rank == 0 and self.hparams.image_log_every and \
                self.global_step % self.hparams.image_log_every == 0:
            self._log_reconstructions(x, recon, "train/reconstructions")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        recon, posterior = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss(x, recon, posterior)
        mse = torch.mean((x - recon) ** 2, dim=(1, 2, 3))
        psnr = (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean()  # data range 2 for [-1, 1]
        metrics = {"val/l1": logs["l1"], "val/lpips": logs["lpips"], "val/kl": logs["kl"], "val/psnr": psnr}
        if self.hparams.score_shapes:  # built-in data: do reconstructions keep colours and shape type?
            from ldm.data.analyze import prompt_accuracy

            acc = prompt_accuracy(recon.detach().float().cpu(), list(batch["caption"]))
            metrics.update({f"val/recon_accuracy/{k}": torch.tensor(v) for k, v in acc.items()})
        self.log_dict(metrics, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.global_rank == 0:
            self._log_reconstructions(x, recon, "val/reconstructions")

    def _log_reconstructions(self, x: torch.Tensor, recon: torch.Tensor, key: str) -> None:
        n = self.hparams.num_log_images
        grid = make_grid(torch.cat([x[:n], recon[:n].detach()]), nrow=min(n, x.shape[0]))
        log_image(self.logger, key, grid, self.global_step, caption="top: inputs, bottom: reconstructions")

    # The frozen LPIPS network is rebuilt from its own weights: keep its ~60 MB out of every checkpoint.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("loss.lpips.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("loss.lpips."):
                state.setdefault(key, value)

    def configure_optimizers(self) -> dict:
        params = list(self.autoencoder.parameters()) + [self.loss.logvar]
        return adamw_with_warmup(params, self.hparams.lr, self.hparams.warmup_steps, self.hparams.betas)
