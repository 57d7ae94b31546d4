"""Frozen OpenCLIP text tower giving per-token context for cross-attention.

With `model_name` + `pretrained` it loads a published OpenCLIP model (e.g. ViT-H-14 / laion2b_s32b_b79k
for SD 2, ViT-L-14 / openai for SD 1); with `model_name: null` it builds a small custom text tower with
random weights so the default pipeline runs offline. Random frozen features still separate the tokens, which
is all the cross-attention needs to learn the built-in data set.

`act` and `pad_id` make the custom tower any CLIP text model: SD 1's (quick_gelu, padded with end-of-text,
49407) or SD 2's (gelu, padded with 0 as OpenCLIP does); ldm.checkpoints.text_encoder fills it with their weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.nn.attention import allowed_kernels
from ldm.nn.transfer import to_device


class OpenCLIPTextEncoder(nn.Module):
    def __init__(self, model_name: str | None = None, pretrained: str | None = None, layer: str = "last",
                 width: int = 64, heads: int = 4, layers: int = 2, context_length: int = 77,
                 cache_dir: str | None = None, freeze: bool = True, seed: int = 0, act: str = "gelu",
                 pad_id: int = 0, mlp_ratio: float = 4.0, vocab_size: int = 49408):
        super().__init__()
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"model.text_encoder.layer must be 'last' or 'penultimate', got {layer!r}")
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"model.text_encoder.act must be 'gelu' or 'quick_gelu', got {act!r}")
        self.layer = layer
        self.context_length = context_length
        self.pad_id = pad_id
        if model_name:
            if pretrained and cache_dir:  # a file `python -m ldm.prefetch` put there: load it, no hub lookup
                from ldm.weights import openclip_weights

                local = openclip_weights(cache_dir, model_name, pretrained)
                pretrained = str(local) if local is not None else pretrained
            model = open_clip.create_model(model_name, pretrained=pretrained or None, cache_dir=cache_dir)
            tower = model.text if hasattr(model, "text") else model
            self.tokenizer = open_clip.get_tokenizer(model_name)
            quick = any(type(m).__name__ == "QuickGELU" for m in tower.modules())
            self.act = "quick_gelu" if quick else "gelu"
        else:
            from open_clip.transformer import TextTransformer

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same random tower in every process and run
                act_layer = open_clip.transformer.QuickGELU if act == "quick_gelu" else nn.GELU
                tower = TextTransformer(context_length=context_length, width=width, heads=heads, layers=layers,
                                        output_dim=width, act_layer=act_layer, mlp_ratio=mlp_ratio,
                                        vocab_size=vocab_size)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
            self.act = act
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.output_dim = self.token_embedding.embedding_dim
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()
        elif layer == "penultimate":
            # forward stops one block early: the last block is kept (its weights round-trip through the export
            # layouts) but not trained, so DDP (find_unused_parameters=False) does not wait for its gradients.
            self.transformer.resblocks[-1].requires_grad_(False)

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        return super().train(mode and not self.frozen)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids, padded after the end-of-text token with pad_id (OpenCLIP's tokenizer pads with 0)."""
        tokens = self.tokenizer(list(captions))
        if self.pad_id:
            eot = self.tokenizer.eot_token_id
            first = (tokens == eot).int().argmax(dim=1, keepdim=True)
            tokens = tokens.masked_fill(torch.arange(tokens.shape[1]) > first, self.pad_id)
        return tokens

    def forward(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, context_length, width) token features."""
        tokens = to_device(self.tokenize(captions), self.token_embedding.weight.device)  # asynchronous to a GPU
        x = self.token_embedding(tokens) + self.positional_embedding
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = list(self.transformer.resblocks)
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        mask = self.attn_mask.to(x.dtype) if self.attn_mask is not None else None
        for block in blocks:
            with allowed_kernels(x, x.shape[-1] // block.attn.num_heads, mask is not None):  # perf.sdpa_backends
                x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return self.ln_final(x)
