"""Building blocks of the CompVis KL autoencoder (`ddconfig` layout, same parameter names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.norm import group_norm


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1-projected when widths differ) skip: CompVis `ResnetBlock`, no temb."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.norm2(h))
        if self.dropout.p > 0 and self.training:
            h = self.dropout(h)
        h = self.conv2(h)
        # in place: conv backward needs its input, not its output, so this saves an allocation safely
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class Downsample(nn.Module):
    """Stride-2 conv with the reference's asymmetric (0,1,0,1) padding, so weights transfer exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _upsample_taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per kernel axis: nearest 2x upsampling then a 3-tap conv equals a stride-2 transposed conv with 4 taps,
    tap t = [w2, w1 + w2, w0 + w1, w0][t] (even outputs see rows i-1, i; odd ones rows i, i+1). Made on the
    device from an identity matrix: a constant host tensor would be copied there on every call."""
    e = torch.eye(3, device=device, dtype=dtype)
    return torch.stack([e[2], e[1] + e[2], e[0] + e[1], e[0]])


class Upsample(nn.Module):
    """Nearest 2x upsampling + 3x3 conv (the reference's parameters), computed as one stride-2 transposed
    conv with folded 4x4 weights: same function, 16/36 of the multiply-adds and no upsampled copy."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = _upsample_taps(x.device, self.conv.weight.dtype)
        kernel = torch.einsum("th,oihw,uw->iotu", taps, self.conv.weight, taps)  # [in, out, 4, 4]
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)
