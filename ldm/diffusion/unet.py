"""The latent UNet with cross-attention, with the CompVis `UNetModel` arguments and parameter names.

A plain nn.Module that knows nothing of files: `from_pretrained` / `save_pretrained` hand off to
`ldm.checkpoints.unet`, which owns every layout (our export, diffusers, CompVis).

Sections in reading order: blocks, transformer, model, presets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import CrossAttention
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.norm import group_norm, zero_module

# ---------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A block that also takes the timestep embedding."""


class ResBlock(TimestepBlock):
    """CompVis ResBlock: GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-(dropout)-conv.

    With use_scale_shift_norm the embedding instead scales and shifts the second GroupNorm's output
    (ADM's adaptive GroupNorm; diffusers' resnet_time_scale_shift="scale_shift"): the time and pooled
    prompt gate features multiplicatively rather than only biasing them.

    The forward calls the submodules itself so it can skip p=0 dropout and work in place on
    intermediates that autograd does not keep (conv outputs, GroupNorm outputs).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 groups: int = 32, use_scale_shift_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels, groups, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = (2 if use_scale_shift_norm else 1) * out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(group_norm(out_channels, groups, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm1, _, conv1 = self.in_layers
        norm2, _, drop, conv2 = self.out_layers
        h = conv1(F.silu(norm1(x), inplace=True))
        emb_out = self.emb_layers[1](F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm2(h), 1 + scale)
        else:
            h = norm2(h.add_(emb_out))
        h = F.silu(h, inplace=True)
        if drop.p and self.training:
            h = drop(h)
        return conv2(h).add_(self._skip(x))

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 skip conv as one batched GEMM on the NCHW map (measured 20-40% faster on CPU than conv2d)."""
        skip = self.skip_connection
        if isinstance(skip, nn.Identity) or not x.is_contiguous():
            return skip(x)
        b, c, h, w = x.shape
        weight = skip.weight.view(1, -1, c).expand(b, -1, -1)
        return torch.baddbmm(skip.bias.view(1, -1, 1), weight, x.view(b, c, h * w)).view(b, -1, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) -> (4*O, I, 2, 2): the 3x3 kernel seen by each of the four nearest-upsampled pixel phases.

    Along one axis, output pixel 2i reads input pixels (i-1, i, i) and 2i+1 reads (i, i, i+1), so
    phase 0 has taps (w0, w1+w2) on offsets (-1, 0) and phase 1 has (w0+w1, w2) on offsets (0, +1).
    """
    def split(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c = w.unbind(dim)
        return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)

    rows = split(weight, 2)
    return torch.cat([k for r in rows for k in split(r, 3)], 0)  # phases (row, col) = 00, 01, 10, 11


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)), computed at the input resolution with 2x2 phase kernels.

    Same function, 16 instead of 36 multiply-adds per input pixel and channel pair, and the 4x larger
    upsampled map is never materialised before the convolution.
    """
    n, _, h, w = x.shape
    out = weight.shape[0]
    y = F.conv2d(x, _phase_kernels(weight), None if bias is None else bias.repeat(4), padding=1)
    # Output channels are phase-major (channel (2a + b) * out + o) and phase (a, b)'s pixel (i, j) sits
    # at (i + a, j + b) of its (h+1, w+1) map.
    if torch.compiler.is_compiling():  # inductor fuses the slices; it cannot order symbolic view strides
        phases = torch.stack([y[:, (2 * a + b) * out:(2 * a + b + 1) * out, a:a + h, b:b + w]
                              for a in (0, 1) for b in (0, 1)], 1).view(n, 2, 2, out, h, w)
    else:  # eager: one strided view picks all four phases, one copy interleaves them
        sn, sc, si, sj = y.stride()
        phase = out * sc
        phases = y.as_strided((n, 2, 2, out, h, w), (sn, 2 * phase + si, phase + sj, sc, si, sj),
                              y.storage_offset())
    return phases.permute(0, 3, 4, 1, 5, 2).reshape(n, out, 2 * h, 2 * w)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (CompVis `Upsample`, parameters `conv.*`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] * x.shape[-1] < 64:  # tiny maps: the plain path's fewer ops win over fewer FLOPs
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return upsample_conv(x, self.conv.weight, self.conv.bias)


# ---------------------------------------------------------------- transformer


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geglu, drop, proj = self.net
        h = geglu(x)
        return proj(drop(h) if drop.p and self.training else h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _project(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv (SD 1.x proj_in/proj_out) or a linear layer (SD 2.x) applied to (b, n, c) tokens."""
    weight = layer.weight if layer.weight.ndim == 2 else layer.weight.flatten(1)
    return F.linear(tokens, weight, layer.bias)


class SpatialTransformer(nn.Module):
    """Pixels as tokens: self-attention, cross-attention to the text context, feed-forward.

    proj_in/proj_out stay Conv2d (SD 1.x) or Linear (SD 2.x) for the parameter names and shapes, but
    both run as one matmul on (b, h*w, c) tokens: a 1x1 conv is that matmul, and the token view is
    free when the feature map is channels-last.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, use_checkpoint: bool = False, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.use_checkpoint = use_checkpoint
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = _project(self.proj_in, self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            if self.use_checkpoint and self.training:
                y = checkpoint(block, y, context, use_reentrant=False)
            else:
                y = block(y, context)
        y = _project(self.proj_out, y)
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding and context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                use_checkpoint: bool = False) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                if use_checkpoint and self.training:
                    x = checkpoint(layer, x, emb, use_reentrant=False)
                else:
                    x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------- model


class UNetModel(nn.Module):
    """eps/v/velocity prediction network on latents, conditioned on time and a token context.

    Arguments and parameter names are CompVis `openaimodel.UNetModel`'s (SD 1.x/2.x `unet_config`
    params), so SD checkpoints load as they are and `ldm.checkpoints.unet` maps them to and from
    diffusers' `UNet2DConditionModel`. `use_checkpoint` recomputes ResBlocks and transformer blocks
    in the backward pass instead of storing their activations.
    """

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_heads: int = -1,
                 num_head_channels: int = -1, transformer_depth: int = 1, context_dim: int | None = None,
                 use_linear_in_transformer: bool = False, dropout: float = 0.0,
                 use_checkpoint: bool = False, num_classes: int | None = None, norm_num_groups: int = 32,
                 pooled_context: bool = False, use_scale_shift_norm: bool = False):
        super().__init__()
        if pooled_context and not context_dim:
            raise ValueError("model.unet.pooled_context needs a context (a text or class conditioner)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("model.unet: set exactly one of num_heads and num_head_channels")
        if not channel_mult or num_res_blocks < 1 or model_channels < 1:
            raise ValueError(f"model.unet: channel_mult={list(channel_mult)}, num_res_blocks={num_res_blocks}, "
                             f"model_channels={model_channels} must be non-empty / positive")
        attn_widths = [model_channels * m for i, m in enumerate(channel_mult) if 2 ** i in attention_resolutions]
        attn_widths.append(model_channels * channel_mult[-1])  # the middle block always attends
        head_key, head_value = ("num_heads", num_heads) if num_heads != -1 else ("num_head_channels", num_head_channels)
        if head_value < 1 or any(w % head_value for w in attn_widths):
            raise ValueError(f"model.unet.{head_key}={head_value} must divide the width of every level with "
                             f"attention (model_channels * channel_mult = {sorted(set(attn_widths))})")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), num_heads=num_heads,
            num_head_channels=num_head_channels, transformer_depth=transformer_depth, context_dim=context_dim,
            use_linear_in_transformer=use_linear_in_transformer, dropout=dropout,
            use_checkpoint=use_checkpoint, num_classes=num_classes, norm_num_groups=norm_num_groups,
            pooled_context=pooled_context, use_scale_shift_norm=use_scale_shift_norm)
        self.model_channels = model_channels
        self.use_checkpoint = use_checkpoint
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        if pooled_context:
            # The prompt's token mean joins the time embedding, so every ResBlock sees it through its scale and
            # shift (SDXL adds its pooled text embedding the same way); zero-initialised, it starts as a no-op.
            self.context_embed = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(),
                                               zero_module(nn.Linear(emb_dim, emb_dim)))

        def attention(ch: int) -> SpatialTransformer:
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            dim_head = ch // heads
            return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, dropout,
                                      use_linear_in_transformer, use_checkpoint, norm_num_groups)

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, norm_num_groups, use_scale_shift_norm)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3,
                                                                             padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, norm_num_groups, eps=1e-5), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be multiples of this."""
        return 2 ** (len(self.config["channel_mult"]) - 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, use_ema: bool = False, **arch: Any) -> UNetModel:
        """Load our export folder, a diffusers UNet folder (or a pipeline folder with `unet/`), or an SD
        checkpoint (.ckpt / .safetensors, whole model or UNet only; `use_ema` picks its EMA weights).

        The architecture comes from the folder's config where there is one, else from `arch` over the
        SD 1.5 preset (SD 2.x is recognised from its linear projections); see `ldm.checkpoints.unet`.
        """
        # reason: a one-line hand-off to the format layer, which sits above the model (layering)
        from ldm.checkpoints.unet import load_unet

        return load_unet(path, use_ema=use_ema, **arch)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `unet.json` + `unet.safetensors`, which `from_pretrained` reads back."""
        # reason: a one-line hand-off to the format layer, which sits above the model (layering)
        from ldm.checkpoints.unet import save_pretrained

        return save_pretrained(self, directory)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from latents x (b, c, h, w) at `timesteps` (b,) or a scalar, with context (b, n, context_dim)."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if (y is not None) != hasattr(self, "label_emb"):
            raise ValueError("UNetModel: pass class labels y exactly when the model has num_classes")
        if y is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)
        if hasattr(self, "context_embed"):
            if context is None:
                raise ValueError("UNetModel: pooled_context needs the context")
            emb = emb + self.context_embed(context.mean(dim=1).to(emb.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, self.use_checkpoint)
            skips.append(h)
        h = self.middle_block(h, emb, context, self.use_checkpoint)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, self.use_checkpoint)
        norm, _, conv = self.out
        return conv(F.silu(norm(h), inplace=True))


# ---------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=1, attention_resolutions=[1, 2, 4],
                 num_head_channels=32, context_dim=64, norm_num_groups=8),
    "small": dict(model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4],
                  num_head_channels=32, context_dim=512),
    "sd15": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                 num_heads=8, context_dim=768),
    "sd21": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                 num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
}


def unet_preset(name: str, **overrides: Any) -> UNetModel:
    """A UNet of a named shape (`PRESETS`), with any argument overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetModel(**{**PRESETS[name], **overrides})
