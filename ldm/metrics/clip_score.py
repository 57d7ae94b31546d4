"""torchmetrics' CLIPScore fed by an OpenCLIP model, through the metric's model-loading hook.

CLIPScore accepts a callable returning (model, processor) with the Hugging Face method names. The two small
adapters below give an open_clip model those names, so scoring uses the same CLIP stack as conditioning
and no second (transformers) CLIP is downloaded. `model_name: null` builds a small random OpenCLIP model:
its scores mean nothing across projects, but the whole path runs offline (tests, the built-in data).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore


class OpenCLIPForScore(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = SimpleNamespace()  # CLIPScore probes config.text_config; OpenCLIP has none

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class OpenCLIPProcessor:
    """Images (C, H, W) in [0, 255] -> resized, normalized pixel_values; texts -> OpenCLIP token ids."""

    def __init__(self, tokenizer: Any, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: list[torch.Tensor] | None = None, text: list[str] | None = None,
                 **_: Any) -> dict[str, torch.Tensor]:
        if images is not None:
            x = torch.stack([img.float() for img in images]) / 255.0
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
            return {"pixel_values": (x - self.mean) / self.std}
        ids = self.tokenizer(list(text or []))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def build_openclip(model_name: str | None = None, pretrained: str | None = None, cache_dir: str | None = None,
                   seed: int = 2) -> tuple[OpenCLIPForScore, OpenCLIPProcessor]:
    import open_clip

    if model_name:
        if pretrained and cache_dir:  # a file `python -m ldm.prefetch` put there: load it, no hub lookup
            from ldm.weights import openclip_weights

            local = openclip_weights(cache_dir, model_name, pretrained)
            pretrained = str(local) if local is not None else pretrained
        model = open_clip.create_model(model_name, pretrained=pretrained or None, cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(model_name)
    else:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # identical on every rank; seed 2 gives positive similarities
            model = open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=8,
                                                                         image_size=32, head_width=32),
                                   text_cfg=CLIPTextCfg(context_length=32, width=64, heads=2, layers=1))
        tokenizer = open_clip.SimpleTokenizer(context_length=32)
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenCLIPForScore(model), OpenCLIPProcessor(tokenizer, int(size), tuple(mean), tuple(std))


def build_clip_score(model_name: str | None = None, pretrained: str | None = None, cache_dir: str | None = None,
                     seed: int = 2) -> CLIPScore:
    """CLIPScore over images in [0, 255] and their captions, scored by an OpenCLIP model."""
    model, processor = build_openclip(model_name, pretrained, cache_dir, seed)
    return CLIPScore(model_name_or_path=lambda: (model, processor))
