"""AutoencoderKL: the first stage of latent diffusion, a plain nn.Module that knows nothing of files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.autoencoder.distribution import DiagonalGaussian
from ldm.autoencoder.encoder import Decoder, Encoder


class AutoencoderKL(nn.Module):
    """Encoder -> (mean, logvar) -> z -> decoder; arguments are the CompVis `ddconfig` keys plus embed_dim."""

    def __init__(self, *, embed_dim: int = 4, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 in_channels: int = 3, out_ch: int = 3, resolution: int = 256, z_channels: int = 4,
                 double_z: bool = True, norm_num_groups: int = 32):
        super().__init__()
        self.config: dict[str, Any] = dict(
            embed_dim=embed_dim, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions), dropout=dropout, in_channels=in_channels, out_ch=out_ch,
            resolution=resolution, z_channels=z_channels, double_z=double_z, norm_num_groups=norm_num_groups)
        arch = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                    dropout=dropout, resolution=resolution, z_channels=z_channels, groups=norm_num_groups)
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **arch)
        self.decoder = Decoder(out_ch=out_ch, **arch)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        # Latent scale a loaded diffusers config declared (SD: 0.18215); None when the source said nothing.
        self.scaling_factor: float | None = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config["embed_dim"]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight measures gradient norms."""
        return self.decoder.conv_out.weight

    # ---- files: the format layer (ldm.checkpoints.autoencoder) reads and writes them -------------------
    def save_pretrained(self, directory: str | Path, format: str = "ldm", **kwargs: Any) -> Path:
        """Export the weights; `format` picks the layout, so one call serves stage 2 and outside tools.

        - "ldm" (default): `directory/autoencoder.safetensors` + `autoencoder.json` (our config).
        - "diffusers": `directory/config.json` + `diffusion_pytorch_model.safetensors`, loadable by
          `diffusers.AutoencoderKL.from_pretrained`; kwargs: scaling_factor, dtype.
        - "compvis": `directory` is the file to write, `.safetensors` or `.ckpt` ({"state_dict": ...}),
          CompVis keys; kwargs: prefix ("first_stage_model." for an SD-checkpoint layout), dtype.
        Every file is written to a temporary name and renamed into place.
        """
        # reason: a one-line hand-off to the format layer, which sits above the model (layering)
        from ldm.checkpoints.autoencoder import save_autoencoder

        return save_autoencoder(self, directory, format, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **arch: Any) -> AutoencoderKL:
        """Load weights from any layout Stable Diffusion users have, told apart by what `path` holds:

        - our export (a folder with autoencoder.safetensors [+ autoencoder.json], or that file);
        - a diffusers folder (config.json + diffusion_pytorch_model.safetensors), or a pipeline folder
          with `vae/`; the config's scaling_factor is kept as `model.scaling_factor`;
        - a CompVis `.ckpt` / `.safetensors`: a whole SD checkpoint (`first_stage_model.*`) or VAE-only;
          the architecture is read off the tensor shapes.
        `arch` overrides ddconfig keys. Pickles are loaded with `weights_only=True` only. An identity
        (pixel-space) export gives the `IdentityAutoencoder`. This is `ldm.checkpoints.autoencoder.load_model`.
        """
        # reason: a one-line hand-off to the format layer, which sits above the model (layering)
        from ldm.checkpoints.autoencoder import load_model

        return load_model(path, **arch)
