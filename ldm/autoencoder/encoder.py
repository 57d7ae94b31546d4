"""Encoder and decoder with the CompVis `ddconfig` arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.blocks import Downsample, ResnetBlock, Upsample
from ldm.nn.attention import SpatialSelfAttention
from ldm.nn.norm import group_norm


def _level(blocks: nn.ModuleList, attn: nn.ModuleList) -> nn.Module:
    level = nn.Module()
    level.block = blocks
    level.attn = attn
    return level


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = SpatialSelfAttention(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, in_channels: int = 3,
                 resolution: int = 256, z_channels: int = 4, double_z: bool = True, groups: int = 32,
                 **_: object):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(SpatialSelfAttention(block_in, groups))
            level = _level(blocks, attn)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, dropout, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 resolution: int = 256, z_channels: int = 4, groups: int = 32, **_: object):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout, groups)
        up: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(SpatialSelfAttention(block_in, groups))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)  # index by level so parameter names match the reference
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
