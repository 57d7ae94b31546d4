"""OpenCLIP text tower <-> transformers CLIPTextModel <-> CompVis single-file keys, checked against transformers."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoints import text_encoder as te
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

from .conftest import randomize

PROMPTS = ["a red circle on a blue background", "", "Two GREEN squares, a dog."]  # no "!": SD 2's CLIPTokenizer reads it as its pad token
# SD 1: CLIP ViT-L/14 (quick-GELU, padded with end-of-text); SD 2: OpenCLIP ViT-H (GELU, padded with 0).
STYLES = {"sd1": {"act": "quick_gelu", "pad_id": te.EOT}, "sd2": {"act": "gelu", "pad_id": 0}}


def tower(style: str, layer: str = "last") -> OpenCLIPTextEncoder:
    enc = OpenCLIPTextEncoder(width=64, heads=2, layers=3, context_length=20, layer=layer, **STYLES[style])
    return randomize(enc, seed=3, std=0.1)


def reference_features(model, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """What diffusers feeds the UNet: the last hidden state, or (clip_skip=1) the penultimate one + final norm."""
    out = model(tokens, output_hidden_states=True)
    if layer == "last":
        return out.last_hidden_state
    return model.text_model.final_layer_norm(out.hidden_states[-2]) if hasattr(model, "text_model") \
        else model.final_layer_norm(out.hidden_states[-2])


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_features_match_clip_text_model(style, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    enc = tower(style)
    enc.layer = "last"  # the full tower in transformers' layout; both layers are read from it
    te.save_transformers(enc, tmp_path / "text_encoder")
    te.save_tokenizer(tmp_path / "tokenizer", enc.context_length, enc.pad_id)
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=enc.context_length, truncation=True,
              return_tensors="pt").input_ids
    tokens = enc.tokenize(PROMPTS)
    assert torch.equal(ids, tokens)  # same ids, same padding (end-of-text for SD 1, 0 for SD 2)
    assert (tokens[1, 2:] == STYLES[style]["pad_id"]).all()
    for layer in ("last", "penultimate"):
        enc.layer = layer
        with torch.no_grad():
            diff = (enc(PROMPTS) - reference_features(ref, tokens, layer)).abs().max().item()
        print(f"text features {style} {layer}: max |ours - CLIPTextModel| = {diff:.2e}")
        assert diff < 1e-4


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_penultimate_tower_round_trips_through_transformers_and_compvis(style, tmp_path, one_thread):
    enc = tower(style, "penultimate" if style == "sd2" else "last")
    te.save_transformers(enc, tmp_path / "text_encoder")
    te.save_tokenizer(tmp_path / "tokenizer", enc.context_length, enc.pad_id)
    kwargs, state = te.load_transformers(tmp_path / "text_encoder")
    assert kwargs["layer"] == enc.layer and kwargs["act"] == enc.act and kwargs["pad_id"] == enc.pad_id
    kwargs.pop("kind")
    back = OpenCLIPTextEncoder(**kwargs).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        assert (back(PROMPTS) - enc(PROMPTS)).abs().max() < 1e-6
    # SD 2 is written without its last block and read back with an identity block in its place: counted in the
    # files written (the weights' layer indices and config.json), not in what the writer was told to write.
    n = len(enc.transformer.resblocks)
    expected = n - 1 if style == "sd2" else n
    written = load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    layers = {int(m[1]) for k in written if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    assert layers == set(range(expected)), sorted(layers)
    config = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == expected

    compvis = te.to_compvis(te.tower_state(enc), style)
    assert all(k.startswith(te.COMPVIS_PREFIX[style]) for k in compvis)
    again, found = te.from_compvis({**compvis, "model.diffusion_model.x": torch.zeros(1)})
    assert found == style
    own = te.tower_state(enc)
    assert again.keys() == own.keys() and all(torch.equal(again[k], own[k]) for k in own)


def test_unknown_transformers_keys_are_refused():
    enc = tower("sd1")
    state = te.openclip_to_transformers(te.tower_state(enc))
    state["text_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="rotary"):
        te.transformers_to_openclip(state)
