"""Reduced-width, SD-shaped StableDiffusionPipelines built with diffusers and transformers (random weights, offline).

SD 1: CLIP text with quick-GELU, padded with end-of-text, epsilon. SD 2: GELU, read at the penultimate layer
(the tower is saved cut after it, as SD 2's diffusers folders are), padded with 0 ("!"), v-prediction.
The tokenizer is made here from open_clip's bundled BPE file, independently of ldm's writer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

CONTEXT = 16
STYLES = {
    "sd1": {"act": "quick_gelu", "pad": "<|endoftext|>", "prediction_type": "epsilon", "text_layers": 3,
            "unet": dict(attention_head_dim=8)},
    "sd2": {"act": "gelu", "pad": "!", "prediction_type": "v_prediction", "text_layers": 2,
            "unet": dict(attention_head_dim=[1, 2], use_linear_projection=True)},
}


def clip_tokenizer(folder: Path, pad: str):
    """CLIP's vocabulary recipe applied to open_clip's bpe_simple_vocab_16e6.txt.gz."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                         model_max_length=CONTEXT)


def jitter(model: torch.nn.Module, seed: int, std: float = 0.03) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised layers would hide mapping mistakes), norms stay near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def build_pipeline(style: str, folder: Path, seed: int = 0):
    """Save a tiny StableDiffusionPipeline of `style` to `folder` (16x16 images, 8x8x4 latents); return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    s = STYLES[style]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                **s["unet"])
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=0.5)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=s["text_layers"],
                                        num_attention_heads=2, max_position_embeddings=CONTEXT, hidden_act=s["act"]))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=s["prediction_type"], timestep_spacing="trailing", steps_offset=1,
                              set_alpha_to_one=True, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=jitter(vae, seed), text_encoder=jitter(text, seed + 1),
                                   tokenizer=clip_tokenizer(folder / "_vocab", s["pad"]),
                                   unet=jitter(unet, seed + 2), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def draw(pipe, prompt: str, seed: int, steps: int, guidance: float):
    """diffusers' picture, called the way docs/interop.md tells users to, as (H, W, 3) uint8."""
    import numpy as np

    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 guidance_scale=guidance).images[0]
    return np.asarray(image)
