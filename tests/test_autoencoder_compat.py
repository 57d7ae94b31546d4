"""Our AutoencoderKL against Stable Diffusion layouts: diffusers folders and CompVis checkpoints, both ways.

Every parameter is randomized (fresh models have zero-initialized layers that would hide a swapped or
dropped weight), and outputs are compared in float32 within 1e-4.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.autoencoder.model import AutoencoderKL
from ldm.checkpoints import autoencoder as ckpt

from .conftest import randomize as _randomize

diffusers = pytest.importorskip("diffusers")

TOL = dict(atol=1e-4, rtol=0)
# Two layouts, each given independently in diffusers' and in CompVis terms.
ARCHS = {
    # tiny, with attention in every block of the 16 px level (AttnDown/AttnUp blocks)
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32,
                  down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
             dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, attn_resolutions=[16],
                  resolution=32)),
    # Stable Diffusion's block layout at a quarter of its width
    "sd": (dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4, sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
           dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4, attn_resolutions=[],
                resolution=32)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return _randomize(model, seed, std=0.1)


def make_diffusers(name: str, seed: int = 0, **extra):
    return randomize(diffusers.AutoencoderKL(**ARCHS[name][0], **extra), seed)


def images(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same_as_diffusers(ours: AutoencoderKL, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        post = ours.encode(x)
        assert dist.mean.abs().max() > 1e-2  # a real signal, not zeros on both sides
        torch.testing.assert_close(post.mean, dist.mean, **TOL)
        torch.testing.assert_close(post.logvar, dist.logvar, **TOL)
        z = dist.mean
        ref = theirs.decode(z).sample
        assert ref.abs().max() > 1e-2
        torch.testing.assert_close(ours.decode(z), ref, **TOL)


def assert_same(a: AutoencoderKL, b: AutoencoderKL, x: torch.Tensor) -> None:
    with torch.no_grad():
        pa, pb = a.encode(x), b.encode(x)
        torch.testing.assert_close(pa.mean, pb.mean, **TOL)
        torch.testing.assert_close(pa.logvar, pb.logvar, **TOL)
        torch.testing.assert_close(a.decode(pa.mean), b.decode(pa.mean), **TOL)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory):
    """(arch name, diffusers model, its saved folder, ours loaded from that folder)."""
    name = request.param
    theirs = make_diffusers(name, scaling_factor=0.13025)
    folder = tmp_path_factory.mktemp(f"diffusers_{name}")
    theirs.save_pretrained(folder)
    ours = AutoencoderKL.from_pretrained(folder).eval()
    return name, theirs, folder, ours


def test_sd_key_names_match_compvis_and_diffusers():
    """Full-size SD VAE (on the meta device): our keys are SD's `first_stage_model.*` names, map 1:1 to
    diffusers' names, and attention weights have the 1x1-conv shape SD checkpoints store."""
    with torch.device("meta"):
        ours = AutoencoderKL(**ckpt.SD_DDCONFIG)
        theirs = diffusers.AutoencoderKL(**ckpt.ddconfig_to_diffusers(ckpt.SD_DDCONFIG))
    state = ours.state_dict()
    assert len(state) == 248
    assert state["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert state["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert state["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert state["encoder.norm_out.weight"].shape == (512,)
    assert "decoder.up.0.upsample.conv.weight" not in state and "encoder.down.3.downsample.conv.weight" not in state
    mapped = ckpt.compvis_to_diffusers(state)
    expected = theirs.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert set(ckpt.diffusers_to_compvis(expected)) == set(state)


def test_diffusers_folder_loads_into_ours(pair):
    name, theirs, folder, ours = pair
    for key, value in ARCHS[name][1].items():
        assert ours.config[key] == value, key
    assert ours.scaling_factor == pytest.approx(0.13025)
    assert_same_as_diffusers(ours, theirs, images())


def test_pipeline_folder_and_old_attention_names(pair, tmp_path):
    """A pipeline folder's vae/ subfolder, written with pre-0.14 diffusers attention names."""
    name, theirs, folder, _ = pair
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(str(folder / "diffusion_pytorch_model.safetensors")).items():
        for new_name, old_name in old.items():
            key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        state[key] = value
    assert any(".query." in k for k in state)
    (tmp_path / "vae").mkdir()
    save_file(state, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "vae" / "config.json").write_text((folder / "config.json").read_text())
    loaded = ckpt.load_autoencoder(tmp_path)
    assert loaded.format == "diffusers" and loaded.scaling_factor == pytest.approx(0.13025)
    assert_same_as_diffusers(loaded.model.eval(), theirs, images(2))
    # the weights file itself, named directly, still takes its folder's config
    direct = AutoencoderKL.from_pretrained(tmp_path / "vae" / "diffusion_pytorch_model.safetensors").eval()
    assert direct.config["resolution"] == 32 and direct.scaling_factor == pytest.approx(0.13025)
    assert_same(direct, loaded.model.eval(), images(2))


def test_compvis_whole_checkpoint_and_vae_only(pair, tmp_path):
    name, theirs, _, ours = pair
    whole = ours.save_pretrained(tmp_path / "sd.ckpt", format="compvis", prefix="first_stage_model.")
    raw = torch.load(whole, weights_only=True)
    assert "first_stage_model.encoder.conv_in.weight" in raw["state_dict"]
    # what else a whole SD checkpoint holds is ignored
    raw["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    raw["state_dict"]["cond_stage_model.transformer.x"] = torch.zeros(2)
    raw["global_step"] = 470000
    torch.save(raw, whole)
    vae_only = ours.save_pretrained(tmp_path / "vae.safetensors", format="compvis")
    state = load_file(str(vae_only))
    assert "encoder.mid.attn_1.q.weight" in state and state["encoder.mid.attn_1.q.weight"].ndim == 4
    state["loss.discriminator.main.0.weight"] = torch.zeros(2)  # as in the published kl-f8 file
    save_file(state, str(vae_only))
    legacy = tmp_path / "legacy.ckpt"  # pre-1.6 torch.save format: cannot be memory-mapped
    torch.save(raw, legacy, _use_new_zipfile_serialization=False)
    for path in (whole, vae_only, legacy):
        loaded = AutoencoderKL.from_pretrained(path, resolution=32).eval()  # architecture read off shapes
        for key, value in ARCHS[name][1].items():
            assert loaded.config[key] == value, (path, key)
        assert_same_as_diffusers(loaded, theirs, images(3))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_training_gradients_match_diffusers(pair):
    """The speed-ups (folded upsample conv, fused q|k|v, in-place residual) keep the backward pass exact."""
    name, theirs, _, ours = pair
    x = images(6)
    losses = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.zero_grad(set_to_none=True)
        if key == "ours":
            post = model.encode(x)
            recon = model.decode(post.sample(torch.Generator().manual_seed(0)))
        else:
            post = model.encode(x).latent_dist
            recon = model.decode(post.sample(generator=torch.Generator().manual_seed(0))).sample
        losses[key] = (recon - x).abs().mean() + 1e-3 * post.kl().mean()
        losses[key].backward()
    torch.testing.assert_close(losses["ours"], losses["theirs"], **TOL)
    ours_grads = ckpt.compvis_to_diffusers({n: p.grad for n, p in ours.named_parameters()})
    for n, p in theirs.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(ours_grads[n].reshape(p.grad.shape), p.grad, atol=1e-4 * max(scale, 1.0),
                                   rtol=0, msg=n)


def test_ours_exports_to_diffusers(pair, tmp_path):
    name, _, _, ours = pair
    source = randomize(AutoencoderKL(**ARCHS[name][1]), seed=5)
    source.save_pretrained(tmp_path / "out", format="diffusers", scaling_factor=0.2)
    theirs, info = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    assert theirs.config.scaling_factor == pytest.approx(0.2)
    assert_same_as_diffusers(source, theirs.eval(), images(4))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                    "diffusion_pytorch_model.safetensors"]


class _RunsCode:
    """Unpickling this calls exec(): what a malicious .ckpt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_pickled_code_in_ckpt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "evil": _RunsCode(marker)}}
    evil = tmp_path / "evil.ckpt"
    torch.save(payload, evil)
    assert b"exec" in evil.read_bytes()  # the payload is in the file, and plain pickle would run it
    with pytest.raises(ValueError, match="evil.ckpt"):
        AutoencoderKL.from_pretrained(evil)
    assert not marker.exists()


def test_bad_paths_and_wrong_keys_name_the_file(pair, tmp_path):
    name, _, folder, ours = pair
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        AutoencoderKL.from_pretrained(tmp_path / "nope.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        AutoencoderKL.from_pretrained(tmp_path / "empty")
    # a CompVis file with a dropped and a foreign key
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    del state["decoder.conv_out.bias"]
    state["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors") as err:
        AutoencoderKL.from_pretrained(bad)
    assert "decoder.conv_out.bias" in str(err.value) and "temb_proj" in str(err.value)
    # the right keys with a wrong caller-given architecture
    good = ours.save_pretrained(tmp_path / "good.safetensors", format="compvis")
    with pytest.raises(ValueError, match="good.safetensors.*shape mismatch"):
        AutoencoderKL.from_pretrained(good, ch_mult=[1, 4, 4, 4][: len(ours.config["ch_mult"])])
    # a diffusers folder with a key diffusers' AutoencoderKL does not have
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    weights["encoder.down_blocks.0.resnets.0.time_emb_proj.weight"] = torch.zeros(2)
    save_file(weights, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="broken.*time_emb_proj"):
        AutoencoderKL.from_pretrained(broken)
    # a pickle that is not a checkpoint at all
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.ckpt"):
        AutoencoderKL.from_pretrained(tmp_path / "junk.ckpt")


def test_other_group_counts_travel_both_ways(tmp_path):
    """diffusers' norm_num_groups (SD: 32) becomes our norm_num_groups and is written back."""
    theirs = make_diffusers("tiny", seed=3, norm_num_groups=16)
    theirs.save_pretrained(tmp_path / "in")
    ours = AutoencoderKL.from_pretrained(tmp_path / "in").eval()
    assert ours.config["norm_num_groups"] == 16 and ours.encoder.norm_out.num_groups == 16
    assert_same_as_diffusers(ours, theirs, images(8))
    ours.save_pretrained(tmp_path / "out", format="diffusers")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["norm_num_groups"] == 16


def test_unrepresentable_configs_are_refused(tmp_path):
    """Refuse rather than write/load a model that computes something else."""
    narrow = AutoencoderKL(ch=16, ch_mult=[1, 2], num_res_blocks=1, resolution=32)  # 16 groups at 16 ch
    with pytest.raises(ValueError, match="norm_num_groups"):
        narrow.save_pretrained(tmp_path / "narrow", format="diffusers")
    assert not (tmp_path / "narrow").exists()
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        ckpt.ddconfig_to_diffusers(dict(z_channels=8, embed_dim=4))
    config = ckpt.ddconfig_to_diffusers(ARCHS["tiny"][1])
    with pytest.raises(ValueError, match="cfg.json.*mid_block_add_attention"):
        ckpt.diffusers_to_ddconfig({**config, "mid_block_add_attention": False}, "cfg.json")
    ddconfig, scale = ckpt.diffusers_to_ddconfig(config)
    assert scale == pytest.approx(ckpt.SD_SCALING_FACTOR)
    assert {k: ddconfig[k] for k in ARCHS["tiny"][1]} == ARCHS["tiny"][1]


def test_our_own_export_still_round_trips(tmp_path):
    ae = randomize(AutoencoderKL(**ARCHS["tiny"][1]), seed=7)
    ae.save_pretrained(tmp_path / "ae")
    assert json.loads((tmp_path / "ae" / "autoencoder.json").read_text()) == ae.config
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae")
    assert loaded.config == ae.config and loaded.scaling_factor is None
    assert_same(loaded.eval(), ae, images(5))
