"""Normalization helpers shared by the autoencoder and the UNet."""

from torch import nn


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with Stable Diffusion's 32 groups, falling back to fewer for tiny test widths."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-init a layer so a residual branch starts as identity (as in the LDM UNet)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
