"""Attention layers; all use F.scaled_dot_product_attention (flash / memory-efficient kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.norm import group_norm


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
        out = self.to_out[0](merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
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
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).view(b, c, h, w)
