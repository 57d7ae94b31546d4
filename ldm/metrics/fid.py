"""FID through torchmetrics, with the standard Inception or a small offline feature extractor.

The Inception path is torchmetrics' own (torch-fidelity's FID Inception weights); compute nodes without internet
pass `feature_extractor_weights_path`. The small extractor is a fixed, seeded random conv net: useless as a
quality number across projects, but it exercises the whole metric path offline (tests, the built-in data).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

FID_EXTRACTORS = ("inception", "small")


class SmallFeatureExtractor(nn.Module):
    """Seeded random conv features; every rank builds identical weights from the seed, so features agree."""

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, num_features, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) * ((2.0 / fan_in) ** 0.5 if p.ndim > 1 else 0.01))
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float in [0, 1], (B, 3, H, W) -> (B, num_features)."""
        return self.net(images.float() * 2 - 1)


def build_fid(extractor: str = "inception", num_features: int = 2048, feature_extractor_weights_path: str | None = None,
              reset_real_features: bool = True) -> FrechetInceptionDistance:
    """FID that takes float images in [0, 1]; `extractor` is "inception" (standard) or "small" (offline)."""
    if extractor == "inception":
        feature: int | nn.Module = num_features
        if feature_extractor_weights_path:
            # torch-fidelity unpickles this file with weights_only=False: read it as data first, so a file that
            # would run code is refused here (a pickle that passes uses only torch's safe types).
            from ldm.checkpoints.files import load_torch_file

            load_torch_file(feature_extractor_weights_path, mmap=False)
    elif extractor == "small":
        feature = SmallFeatureExtractor(num_features)
    else:
        raise ValueError(f"fid extractor={extractor!r}: choose one of {FID_EXTRACTORS}")
    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=reset_real_features,
                                    feature_extractor_weights_path=feature_extractor_weights_path
                                    if extractor == "inception" else None)
