"""LPIPS perceptual distance (Zhang et al. 2018): VGG16 features + learned linear heads.

`pretrained=True` loads torchvision's ImageNet VGG16 and the published LPIPS heads shipped inside the
`lpips` package; `pretrained=False` builds the same network with random weights so tests stay offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Slices of torchvision's vgg16().features ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    def __init__(self, pretrained: bool = False, weights_path: str | None = None):
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16

        vgg = vgg16(weights=VGG16_Weights.IMAGENET1K_V1 if pretrained else None).features
        self.slices = nn.ModuleList(nn.Sequential(*[vgg[i] for i in range(a, b)]) for a, b in _VGG_SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _VGG_CHANNELS)
        # Input scaling the published heads were trained with (inputs in [-1, 1]).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained or weights_path:
            self._load_heads(weights_path)
        else:
            for lin in self.lins:
                nn.init.constant_(lin.weight, 1.0 / lin.in_channels)
        self.requires_grad_(False)
        self.eval()

    def _load_heads(self, weights_path: str | None) -> None:
        if weights_path is None:
            import lpips as lpips_pkg

            weights_path = str(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(state[f"lin{i}.model.1.weight"])

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen feature network: never switch to training behaviour

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance, shape (B,), inputs in [-1, 1]."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for block, lin in zip(self.slices, self.lins, strict=True):
            hx, hy = block(hx), block(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total
