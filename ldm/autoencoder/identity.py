"""The identity "autoencoder": pixel-space diffusion through the same stage=ldm module (factor 1, scale 1).

`model/autoencoder=identity` swaps it in for AutoencoderKL: encode gives the image itself as a posterior with
(almost) zero variance, decode returns its input. There is nothing to train, so stage=ldm needs no stage-1
export; it exists to measure the paper's claim that moderate compression learns faster per compute than
pixel space (docs/results.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.autoencoder.distribution import DiagonalGaussian
from ldm.autoencoder.model import AutoencoderKL

KIND = "identity"


class IdentityAutoencoder(nn.Module):
    """AutoencoderKL's interface with no weights: images are their own latents."""

    def __init__(self, *, in_channels: int = 3, resolution: int = 32, **ignored: Any):
        super().__init__()
        # ch_mult [1]: factor 1 wherever a config is read for the downsampling factor (checks, sample.py).
        self.config: dict[str, Any] = dict(kind=KIND, in_channels=in_channels, embed_dim=in_channels,
                                           resolution=resolution, ch_mult=[1], attn_resolutions=[])
        self.scaling_factor: float | None = 1.0

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.config["in_channels"]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.mode()), posterior

    def save_pretrained(self, directory: str | Path, format: str = "ldm", **kwargs: Any) -> Path:
        """Only our own layout, a config without weights; diffusers and CompVis have no identity VAE."""
        # reason: a one-line hand-off to the format layer, which sits above the model (layering)
        from ldm.checkpoints.autoencoder import save_autoencoder

        return save_autoencoder(self, directory, format, **kwargs)


def is_identity(config: dict[str, Any] | None) -> bool:
    return bool(config) and config.get("kind") == KIND


def build_autoencoder(config: dict[str, Any]) -> nn.Module:
    """`model.autoencoder` config -> AutoencoderKL, or IdentityAutoencoder for `kind: identity`."""
    arch = {k: v for k, v in config.items() if k not in ("init_from", "kind")}
    if is_identity(config):
        return IdentityAutoencoder(**arch)
    return AutoencoderKL(**arch)
