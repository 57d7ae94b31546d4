"""Stage-1 loss: L1 + LPIPS reconstruction with a learned log-variance, KL, and a patch-GAN term.

Follows the paper's autoencoder recipe: the generator's adversarial term is weighted adaptively by the ratio of
gradient norms at the decoder's last layer, and switched on only after `disc_start` steps, once reconstructions
are reasonable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.discriminator import NLayerDiscriminator
from ldm.autoencoder.distribution import DiagonalGaussian
from ldm.autoencoder.lpips import LPIPS

DISC_LOSSES = ("hinge", "vanilla")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """||d nll / d W|| / ||d g / d W|| at the decoder's last layer: the GAN term never dominates reconstruction.

    `scale` multiplies both losses before differentiating (the AMP loss scale), so fp16 gradients neither
    underflow nor change the ratio. Averaged over DDP ranks so every rank applies the same weight.
    """
    nll_grad = torch.autograd.grad(nll * scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)[0]
    ratio = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4 * scale)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=1e4).clamp(0.0, 1e4)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ratio, op=dist.ReduceOp.SUM)
        ratio = ratio / dist.get_world_size()
    return ratio.detach()


class VAELoss(nn.Module):
    """Generator side: NLL (|x - x'| + w * LPIPS over exp(logvar)) + kl_weight * KL + adaptive * disc_factor * GAN.

    Discriminator side: hinge or vanilla loss on real images against detached reconstructions.
    """

    def __init__(self, perceptual_weight: float = 1.0, kl_weight: float = 1e-6, logvar_init: float = 0.0,
                 lpips_pretrained: bool = False, lpips_weights_path: str | None = None,
                 disc_start: int = 50001, disc_factor: float = 1.0, disc_weight: float = 0.5,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_ndf: int = 64,
                 disc_loss: str = "hinge"):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"loss.disc_loss={disc_loss!r}: choose one of {DISC_LOSSES}")
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.disc_start = int(disc_start)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.lpips = LPIPS(pretrained=lpips_pretrained, weights_path=lpips_weights_path) \
            if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
        self.disc_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

    def disc_active(self, global_step: int) -> bool:
        return self.disc_factor > 0 and global_step >= self.disc_start

    def reconstruction(self, inputs: torch.Tensor, recon: torch.Tensor,
                       posterior: DiagonalGaussian) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(NLL + kl_weight * KL, NLL, logs): the whole loss before the discriminator starts."""
        rec = (inputs.float() - recon.float()).abs()
        l1 = rec.mean()
        p_loss = torch.zeros((), device=inputs.device)
        if self.lpips is not None:
            per_sample = self.lpips(inputs.contiguous(), recon.contiguous()).float()
            rec = rec + self.perceptual_weight * per_sample.view(-1, 1, 1, 1)
            p_loss = per_sample.mean()
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / inputs.shape[0]
        kl = posterior.kl().float().mean()
        loss = nll + self.kl_weight * kl
        logs = {"nll": nll.detach(), "l1": l1.detach(), "lpips": p_loss.detach(), "kl": kl.detach(),
                "logvar": self.logvar.detach()}
        return loss, nll, logs

    def generator(self, inputs: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
                  global_step: int, last_layer: torch.Tensor | None = None,
                  grad_scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, nll, logs = self.reconstruction(inputs, recon, posterior)
        if self.disc_active(global_step):
            logits_fake = self.discriminator(recon.contiguous()).float()
            g_loss = -logits_fake.mean()
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_weight(nll, g_loss, last_layer, grad_scale) * self.disc_weight
            else:  # validation: no graph to measure, use the plain weight
                weight = torch.tensor(self.disc_weight, device=inputs.device)
            loss = loss + weight * self.disc_factor * g_loss
            logs.update({"g_loss": g_loss.detach(), "adaptive_weight": weight.detach(),
                         "logits_fake_g": logits_fake.detach().mean()})
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(inputs.contiguous().detach()).float()
        logits_fake = self.discriminator(recon.contiguous().detach()).float()
        factor = self.disc_factor if self.disc_active(global_step) else 0.0
        d_loss = factor * self.disc_loss_fn(logits_real, logits_fake)
        logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return d_loss, logs
