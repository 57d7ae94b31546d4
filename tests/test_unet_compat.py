"""UNet compatibility with Stable Diffusion (CompVis) checkpoints and diffusers, both ways, at reduced sizes."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoints.unet import (
    compvis_to_diffusers,
    config_from_diffusers,
    diffusers_config,
    diffusers_to_compvis,
    guess_arch,
    save_compvis,
    save_diffusers,
)
from ldm.diffusion.unet import PRESETS, UNetModel, unet_preset, upsample_conv
from ldm.nn.embeddings import timestep_embedding

from .conftest import block_runs
from .conftest import randomize as _randomize

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

# Reduced SD 1.x and 2.x shapes written the way their real config.json files are: 4 levels, attention on
# the first three, 2 res blocks; SD1 has 8 heads everywhere (diffusers' `attention_head_dim` is a head
# count), SD2 has 16-channel heads (a per-level head count), linear projections and depth 2 here.
SD1 = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=8, cross_attention_dim=32)
SD2 = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=[2, 4, 4, 4], cross_attention_dim=48,
           use_linear_projection=True, transformer_layers_per_block=2)
OURS = {
    "sd1": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[1, 2, 4],
                num_heads=8, num_head_channels=-1, transformer_depth=1, context_dim=32,
                use_linear_in_transformer=False),
    "sd2": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[1, 2, 4],
                num_heads=-1, num_head_channels=16, transformer_depth=2, context_dim=48,
                use_linear_in_transformer=True),
}
DIFFUSERS = {"sd1": SD1, "sd2": SD2}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return _randomize(model, seed, std=0.05)


def inputs(context_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 700]), torch.randn(2, 7, context_dim, generator=g)


def diffusers_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    return randomize(UNet2DConditionModel(sample_size=16, **DIFFUSERS[kind]), seed)


def assert_same_output(ours: UNetModel, theirs: UNet2DConditionModel, context_dim: int, **extra) -> None:
    x, t, c = inputs(context_dim)
    with torch.no_grad():
        y = extra["class_labels"] if extra and not ours.config.get("pooled_context") else None
        a = ours.eval()(x, t, c, y=y)
        b = theirs.eval()(x, t, encoder_hidden_states=c, return_dict=False, **extra)[0]
    assert b.abs().max() > 1e-2  # a meaningful comparison
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_folder_loads_with_same_outputs(kind, tmp_path):
    theirs = diffusers_unet(kind)
    theirs.save_pretrained(tmp_path / "pipeline" / "unet")
    for path in (tmp_path / "pipeline" / "unet", tmp_path / "pipeline"):  # the UNet folder or a pipeline's
        ours = UNetModel.from_pretrained(path)
        assert {k: ours.config[k] for k in OURS[kind]} == OURS[kind]
        assert_same_output(ours, theirs, OURS[kind]["context_dim"])


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_compvis_checkpoints_load_live_or_ema_weights(kind, tmp_path):
    ema_model = diffusers_unet(kind, seed=1)
    live_model = diffusers_unet(kind, seed=2)
    ema = diffusers_to_compvis(ema_model.state_dict(), OURS[kind])
    live = diffusers_to_compvis(live_model.state_dict(), OURS[kind])
    # A whole SD checkpoint: UNet, LitEma copy (dots removed from names), and other models' weights.
    state = {"model.diffusion_model." + k: v for k, v in live.items()}
    state.update({"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in ema.items()})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
                  "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)})
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    arch = OURS[kind]
    assert_same_output(UNetModel.from_pretrained(ckpt, use_ema=True, **arch), ema_model, arch["context_dim"])
    assert_same_output(UNetModel.from_pretrained(ckpt, **arch), live_model, arch["context_dim"])
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in live.items()}, str(unet_only))
    # Widths, context size and projection kind are read off the weights; the rest comes from arch.
    shapes_say = ("model_channels", "context_dim", "use_linear_in_transformer", "num_heads")
    partial = {k: v for k, v in arch.items() if k not in shapes_say or (kind == "sd1" and k == "num_heads")}
    assert_same_output(UNetModel.from_pretrained(unet_only, **partial), live_model, arch["context_dim"])


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1-classes", "sd1-groups8", "sd2-pooled",
                                  "sd2-pooled-scaleshift"])
def test_ours_round_trips_through_diffusers_and_compvis(kind, tmp_path):
    arch = dict(OURS[kind.split("-")[0]], num_classes=5 if kind.endswith("classes") else None)
    if kind.endswith("groups8"):  # the tiny preset's GroupNorm: diffusers' norm_num_groups carries it
        arch["norm_num_groups"] = 8
    arch["pooled_context"] = "pooled" in kind
    arch["use_scale_shift_norm"] = kind.endswith("scaleshift")  # diffusers' resnet_time_scale_shift="scale_shift"
    ours = randomize(UNetModel(**arch), seed=3)
    extra = {"class_labels": torch.tensor([1, 4])} if arch["num_classes"] else {}
    if arch["pooled_context"]:  # diffusers' projection class embedding, fed the context's token mean
        extra = {"class_labels": inputs(arch["context_dim"])[2].mean(dim=1)}
    save_diffusers(ours, tmp_path / "diffusers", sample_size=16)
    theirs, info = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert_same_output(ours, theirs, arch["context_dim"], **extra)
    assert guess_arch(ours.state_dict()).get("use_scale_shift_norm", False) == arch["use_scale_shift_norm"]
    for path in (tmp_path / "sd.safetensors", tmp_path / "sd.ckpt"):
        save_compvis(ours, path, ema=ours)
        back = UNetModel.from_pretrained(path, use_ema=True, **arch)
        assert_same_output(back, theirs, arch["context_dim"], **extra)
    ours.save_pretrained(tmp_path / "ours")
    assert_same_output(UNetModel.from_pretrained(tmp_path / "ours"), theirs, arch["context_dim"], **extra)
    # The training export: EMA weights only, the config under "unet" next to other metadata.
    export = tmp_path / "export"
    export.mkdir()
    (tmp_path / "ours" / "unet.safetensors").rename(export / "unet_ema.safetensors")
    (export / "unet.json").write_text(json.dumps({"unet": ours.config, "scale_factor": 0.18}))
    assert_same_output(UNetModel.from_pretrained(export, use_ema=True), theirs, arch["context_dim"], **extra)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temporaries


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_key_names_and_shapes_match_stable_diffusion(preset):
    with torch.device("meta"):  # no memory: only names and shapes
        ours = unet_preset(preset)
        theirs = UNet2DConditionModel.from_config(diffusers_config(ours.config, sample_size=64))
    state = ours.state_dict()
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.3.0.op.weight", "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "out.2.weight"):
        assert key in state, key
    assert len(state) == 686  # the SD 1.x / 2.x UNet's tensor count
    assert state["middle_block.1.proj_in.weight"].ndim == (2 if preset == "sd21" else 4)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == ours.config["context_dim"]
    converted = compvis_to_diffusers(state, ours.config)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert diffusers_to_compvis(converted, ours.config).keys() == state.keys()
    heads = {"sd15": 8, "sd21": [5, 10, 20, 20]}[preset]  # as in the released config.json files
    assert diffusers_config(ours.config)["attention_head_dim"] == heads
    back = config_from_diffusers(diffusers_config(ours.config))
    assert {k: back[k] for k in PRESETS[preset]} == {k: ours.config[k] for k in PRESETS[preset]} | {
        "attention_resolutions": [1, 2, 4]}


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 320), ref)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}, evil)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="refused to unpickle"):
        UNetModel.from_pretrained(evil)
    assert not marker.exists() and set(os.listdir(tmp_path)) == before


def test_load_errors_name_the_file_and_keys(tmp_path):
    ours = randomize(UNetModel(**OURS["sd1"]), seed=4)
    path = tmp_path / "unet.safetensors"
    save_compvis(ours, path)
    with pytest.raises(ValueError, match=r"unet\.safetensors.*missing .*input_blocks"):
        UNetModel.from_pretrained(path, **dict(OURS["sd1"], num_res_blocks=3))
    with pytest.raises(FileNotFoundError):
        UNetModel.from_pretrained(tmp_path / "nothing.ckpt")
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetModel(**dict(OURS["sd2"], num_head_channels=24))


def test_gradient_checkpointing_gives_the_same_gradients():
    arch = dict(OURS["sd2"], channel_mult=[1, 2], attention_resolutions=[1, 2], dropout=0.0)
    plain = randomize(UNetModel(**arch), seed=5).train()
    ckpt = UNetModel(**dict(arch, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, c = inputs(arch["context_dim"])
    grads, runs = [], []
    for model in (plain, ckpt):
        model.zero_grad()
        runs.append(block_runs(model, lambda m=model: m(x, t, c).square().mean().backward()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(runs[0]) == {1} and set(runs[1]) == {2}, runs  # checkpointing recomputed every block in backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_training_gradients_match_diffusers():
    """The backward pass too: in-place ops, fused projections and the low-resolution upsample conv."""
    theirs = diffusers_unet("sd2", seed=6).train()
    ours = UNetModel(**OURS["sd2"]).train()
    ours.load_state_dict(diffusers_to_compvis(theirs.state_dict(), ours.config))
    x, t, c = inputs(OURS["sd2"]["context_dim"])
    target = torch.randn_like(x)
    torch.nn.functional.mse_loss(ours(x, t, c), target).backward()
    torch.nn.functional.mse_loss(theirs(x, t, encoder_hidden_states=c).sample, target).backward()
    expected = diffusers_to_compvis({n: p.grad for n, p in theirs.named_parameters()}, ours.config)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-6, msg=name)


def test_upsample_conv_equals_nearest_upsample_then_conv():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 8, 6, generator=g, requires_grad=True)
    w = torch.randn(5, 8, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0), w, b, padding=1)
    out = upsample_conv(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    seed = torch.randn(ref.shape, generator=g)
    for a, e in zip(torch.autograd.grad(out, (x, w, b), seed), torch.autograd.grad(ref, (x, w, b), seed), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
