"""Stage-1 loss: L1 + LPIPS reconstruction with a learned log-variance, plus a small KL term."""

from __future__ import annotations

import torch
from torch import nn

from ldm.autoencoder.distribution import DiagonalGaussian
from ldm.autoencoder.lpips import LPIPS


class VAELoss(nn.Module):
    """The reference recipe's negative log-likelihood (per-pixel |x-x'| + w*LPIPS over exp(logvar)) + KL.

    The patch-GAN term joins this loss in a later stage; the weights here use the reference names.
    """

    def __init__(self, perceptual_weight: float = 1.0, kl_weight: float = 1e-6, logvar_init: float = 0.0,
                 lpips_pretrained: bool = False, lpips_weights_path: str | None = None):
        super().__init__()
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.lpips = LPIPS(pretrained=lpips_pretrained, weights_path=lpips_weights_path) \
            if perceptual_weight > 0 else None

    def forward(self, inputs: torch.Tensor, recon: torch.Tensor,
                posterior: DiagonalGaussian) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = (inputs - recon).abs()
        l1 = rec.mean()
        p_loss = torch.zeros((), device=inputs.device)
        if self.lpips is not None:
            per_sample = self.lpips(inputs.contiguous(), recon.contiguous())
            rec = rec + self.perceptual_weight * per_sample.view(-1, 1, 1, 1)
            p_loss = per_sample.mean()
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll = nll.sum() / inputs.shape[0]
        kl = posterior.kl().mean()
        loss = nll + self.kl_weight * kl
        logs = {"loss": loss.detach(), "nll": nll.detach(), "l1": l1.detach(), "lpips": p_loss.detach(),
                "kl": kl.detach(), "logvar": self.logvar.detach()}
        return loss, logs
