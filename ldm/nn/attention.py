"""Attention layers; all use F.scaled_dot_product_attention (flash / memory-efficient kernels)."""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.nn.norm import group_norm

_ANY_KERNEL = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
               SDPBackend.MATH]


def _enabled_kernels() -> tuple[str, ...]:
    """The SDPA kernels the process allows (perf.sdpa_backends, or an sdpa_kernel context)."""
    flags = {"flash": torch.backends.cuda.flash_sdp_enabled(), "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
             "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    return tuple(name for name, on in flags.items() if on)


@functools.cache
def _probe(enabled: tuple[str, ...], device: str, dtype: torch.dtype, head_dim: int, has_mask: bool,
           autocast: tuple[bool, torch.dtype]) -> bool:
    """True when no allowed kernel serves this kind of call; warns once for it."""
    q = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 2, 2, device=device, dtype=torch.bool) if has_mask else None
    try:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return False
    except RuntimeError as err:
        if "No available kernel" not in str(err) and "No viable backend" not in str(err):
            raise
    warnings.warn(f"scaled_dot_product_attention: none of the allowed kernels ({', '.join(enabled)}; "
                  f"perf.sdpa_backends) serves head dim {head_dim} in {str(dtype).removeprefix('torch.')} on "
                  f"{device}{' with a mask' if has_mask else ''}; these calls fall back to PyTorch's own choice",
                  stacklevel=3)
    return True


@torch._dynamo.assume_constant_result
def _needs_fallback(device: str, dtype: torch.dtype, head_dim: int, has_mask: bool) -> bool:
    """Decided once per kind of call, from its device, dtype and head dim; under torch.compile at trace time (a
    constant of the graph), so the choice costs nothing per step."""
    if device == "meta":
        return False
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return _probe(_enabled_kernels(), device, dtype, head_dim, has_mask, autocast)


def allowed_kernels(x: torch.Tensor, head_dim: int, masked: bool) -> contextlib.AbstractContextManager:
    """For attention that calls SDPA itself (OpenCLIP's text blocks): every kernel allowed where the allowed ones
    cannot serve (head_dim, x's dtype and device, a mask), as in `attention`; otherwise nothing changes."""
    if _needs_fallback(x.device.type, x.dtype, head_dim, masked):
        return sdpa_kernel(_ANY_KERNEL)
    return contextlib.nullcontext()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, except where the allowed kernels cannot serve the call.

    perf.sdpa_backends=[flash] is a speed choice for the UNet's attention; flash has no float32 kernel and no
    head dim above 256 (the autoencoder's mid-block attention has one head of 512 channels). Such calls run
    with every kernel allowed, after one warning, instead of stopping the run.
    """
    if _needs_fallback(q.device.type, q.dtype, q.shape[-1], mask is not None):
        with sdpa_kernel(_ANY_KERNEL):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, h*d) -> (b, h, n, d), a view."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, h, n, d) -> (b, n, h*d); free when the attention kernel already wrote (b, n, h, d) memory."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over `context` (self-attention when context is None).

    Parameters keep the CompVis / diffusers names (to_q, to_k, to_v, to_out.0) so checkpoints load
    as they are; at run time the key and value projections share one matmul (and the query too in
    self-attention) by concatenating the weights, which is one GEMM forward and backward instead of
    two or three.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.heads
        if context is None:
            qkv = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            q, k, v = (split_heads(t, h) for t in qkv.chunk(3, dim=-1))
        else:
            q = split_heads(self.to_q(x), h)
            kv = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight]))
            k, v = (split_heads(t, h) for t in kv.chunk(2, dim=-1))
        out = self.to_out[0](merge_heads(attention(q, k, v, mask)))
        drop = self.to_out[1]
        return drop(out) if drop.p and self.training else out


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels, the autoencoder's mid-block attention (CompVis AttnBlock)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1-conv parameters (CompVis names and shapes) run as one fused q|k|v matmul on [b, n, c]
        # tokens, so SDPA gets unit-stride heads and can take its fused kernel instead of the math path.
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * c, c)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).unsqueeze(1).chunk(3, dim=-1)
        out = attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).view(b, c, h, w)
