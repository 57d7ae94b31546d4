"""PatchGAN discriminator (pix2pix's N-layer design), as used by the paper's autoencoders.

Each output logit judges one receptive-field patch, so the adversarial term sharpens local texture
without asking the autoencoder to match global statistics.
"""

from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    """conv(4, s2) + LeakyReLU, then `num_layers` strided blocks with BatchNorm, then a 1-channel logit map."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError("discriminator num_layers must be >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as pix2pix and the reference autoencoder recipe use.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
