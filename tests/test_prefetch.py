"""prefetch fills the weights cache; offline=true trains from it with no network, or stops naming what is missing.

No network: torch.hub's file download and the Hugging Face hub download are replaced by copies from a
fixture "server" folder the tests fill with random-weight files; ldm.weights' downloaders run as they are.
"""

import shutil
import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm import weights
from ldm.prefetch import main as prefetch_main
from ldm.train.checks import ConfigError

from .conftest import ROOT

HEAVY = ["stage.module.loss.lpips_pretrained=true", "stage.module.metrics.fid.extractor=inception"]


def compose_train(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """What the internet would serve: an Inception with random weights (the real architecture, so FID
    builds from it), and placeholder files for the rest (only their presence is checked here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    root = tmp_path_factory.mktemp("server")
    with pytest.MonkeyPatch.context() as m:  # build the network without its download
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    torch.save(net.state_dict(), root / Path(weights.INCEPTION_URL).name)
    torch.save({"features.0.weight": torch.zeros(1)}, root / Path(weights.VGG16_URL).name)
    (root / "open_clip_model.safetensors").write_bytes(b"not real weights")
    return root


@pytest.fixture
def no_download_from_internet(server, monkeypatch):
    """Only the network layer is fake: torch.hub's file download and the Hugging Face hub download open_clip calls
    copy from the fixture server (the hub one into a hub-style cache: a blob and a snapshot symlink to it), and
    record what they were asked for. ldm.weights' own file handling runs as it does for users."""
    import open_clip.pretrained
    import torch.hub

    calls = []

    def url_to_file(url, dst, *args, **kwargs):
        calls.append(url)
        shutil.copyfile(server / Path(url).name, dst)

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        if not (server / filename).is_file():
            raise FileNotFoundError(f"{repo_id}/{filename} is not on the server")
        calls.append(f"{repo_id}/{filename}")
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        blob = repo / "blobs" / "5f1ce0a1"
        blob.parent.mkdir(parents=True)
        shutil.copyfile(server / filename, blob)
        link = repo / "snapshots" / "0" / filename
        link.parent.mkdir(parents=True)
        link.symlink_to(Path("..", "..", "blobs", blob.name))
        return str(link)

    monkeypatch.setattr(torch.hub, "download_url_to_file", url_to_file)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return calls


def isolate_env(monkeypatch):
    """use_offline_cache sets these in os.environ; recorded here, so they are undone after the test."""
    for var in ("TORCH_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import sys

    if "huggingface_hub" in sys.modules:  # it reads HF_HUB_OFFLINE at import; use_offline_cache sets the constant
        constants = sys.modules["huggingface_hub"].constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)


def test_needed_weights_follow_the_config(tmp_path):
    cache = f"paths.weights_cache={tmp_path}"
    assert weights.needed_weights(compose_train(cache)) == []  # the default run is random-init: offline as is
    assert weights.needed_weights(compose_train("stage=ldm", cache)) == []
    vae = {w.path.name: w.key for w in weights.needed_weights(compose_train(cache, *HEAVY))}
    assert vae == {"vgg16-397923af.pth": "stage.module.loss.lpips_pretrained",
                   "vgg.pth": "stage.module.loss.lpips_pretrained",
                   "weights-inception-2015-12-05-6726825d.pth": "stage.module.metrics.fid.extractor"}
    (ldm,) = weights.needed_weights(compose_train("stage=ldm", "model/text_encoder=openclip_vit_h14", cache))
    assert ldm.path == tmp_path / "open_clip" / "ViT-H-14" / "laion2b_s32b_b79k" and ldm.folder
    mine = tmp_path / "heads.pth"  # a file the user named is checked, never fetched
    (heads,) = [w for w in weights.needed_weights(
        compose_train(cache, HEAVY[0], f"stage.module.loss.lpips_weights_path={mine}")) if w.fetch is None]
    assert heads.path == mine and heads.key == "stage.module.loss.lpips_weights_path"


def test_prefetch_fills_the_cache_then_offline_check_names_the_missing_file(tmp_path, no_download_from_internet,
                                                                           capsys, monkeypatch):
    overrides = [f"paths.weights_cache={tmp_path}/cache", *HEAVY]
    assert prefetch_main(["--check", *overrides]) == 1
    assert prefetch_main(overrides) == 0
    printed = capsys.readouterr().out
    hub = tmp_path / "cache" / "torch" / "hub" / "checkpoints"
    for path in (hub / "vgg16-397923af.pth", hub / "weights-inception-2015-12-05-6726825d.pth",
                 tmp_path / "cache" / "lpips" / "vgg.pth"):
        assert path.is_file() and f"fetched  {path}" in printed
    assert no_download_from_internet == [weights.VGG16_URL, weights.INCEPTION_URL]  # heads: from the lpips package
    assert prefetch_main(overrides) == 0 and len(no_download_from_internet) == 2  # present files are not fetched again
    assert prefetch_main(["--check", *overrides]) == 0

    isolate_env(monkeypatch)
    cfg = compose_train("offline=true", *overrides)
    weights.use_offline_cache(cfg)
    assert cfg.stage.module.metrics.fid.feature_extractor_weights_path == str(
        hub / "weights-inception-2015-12-05-6726825d.pth")
    assert cfg.stage.module.loss.lpips_weights_path == str(tmp_path / "cache" / "lpips" / "vgg.pth")
    import os

    assert os.environ["TORCH_HOME"] == str((tmp_path / "cache" / "torch").resolve())

    (hub / "vgg16-397923af.pth").unlink()
    with pytest.raises(ConfigError) as err:
        weights.use_offline_cache(compose_train("offline=true", *overrides), ["stage=vae"])
    message = str(err.value)
    assert str(hub / "vgg16-397923af.pth") in message and "stage.module.loss.lpips_pretrained" in message
    assert "lacks 1 file" in message and "python -m ldm.prefetch stage=vae" in message


def test_openclip_text_encoder_loads_the_prefetched_file(tmp_path, no_download_from_internet, monkeypatch):
    """The text encoder asks open_clip for the cached file, never the hub, once prefetch put it there."""
    import open_clip

    from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

    overrides = ["stage=ldm", "model/text_encoder=openclip_vit_h14", f"paths.weights_cache={tmp_path}"]
    assert prefetch_main(overrides) == 0
    assert no_download_from_internet == ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_model.safetensors"]
    cfg = compose_train("offline=true", *overrides)
    isolate_env(monkeypatch)
    weights.use_offline_cache(cfg)
    asked = {}

    class Stop(Exception):
        pass

    def create_model(name, pretrained=None, cache_dir=None, **kwargs):
        asked.update(name=name, pretrained=pretrained)
        raise Stop  # building ViT-H would take a minute; what it was asked to load is the point

    monkeypatch.setattr(open_clip, "create_model", create_model)
    with pytest.raises(Stop):
        OpenCLIPTextEncoder(**{k: v for k, v in cfg.model.text_encoder.items() if k != "kind"})
    expected = tmp_path / "open_clip" / "ViT-H-14" / "laion2b_s32b_b79k" / "open_clip_model.safetensors"
    assert asked == {"name": "ViT-H-14", "pretrained": str(expected)}
    # a plain file with the served bytes (not a link into the hub cache prefetch downloaded into, now removed)
    assert not expected.is_symlink() and expected.read_bytes() == b"not real weights"
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]


def test_training_starts_offline_without_network(tmp_path, tiny_shapes, no_download_from_internet, monkeypatch,
                                                 one_thread):
    """prefetch, then a one-step stage=vae run whose FID Inception comes from the cache, with sockets blocked."""
    from ldm.train.cli import train

    cache = f"paths.weights_cache={tmp_path}/cache"
    fid = ["stage.module.metrics.fid.extractor=inception", "stage.module.metrics.fid.num_features=64"]
    assert prefetch_main([cache, *fid]) == 0
    isolate_env(monkeypatch)
    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = compose_train("offline=true", cache, *fid, "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1",
                        "trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                        "data.resolution=16", "data.batch_size=4", "data.num_workers=0",
                        f"data.train_shards={tiny_shapes}/train", f"data.val_shards={tiny_shapes}/val",
                        f"paths.runs={tmp_path}/runs", f"paths.exports={tmp_path}/exports")
    built = {}
    import torchmetrics.image.fid as tm_fid

    real = tm_fid.NoTrainInceptionV3.__init__

    def spy(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        built["path"] = feature_extractor_weights_path
        real(self, name, features_list, feature_extractor_weights_path, **kwargs)

    monkeypatch.setattr(tm_fid.NoTrainInceptionV3, "__init__", spy)
    train(cfg)
    assert built["path"] == str(tmp_path / "cache" / "torch" / "hub" / "checkpoints" / Path(weights.INCEPTION_URL).name)
    assert (tmp_path / "exports" / "autoencoder" / "autoencoder.safetensors").is_file()

    Path(built["path"]).unlink()  # the same run with the file gone stops before building anything
    with pytest.raises(ConfigError, match="weights-inception-2015-12-05-6726825d.pth"):
        train(compose_train("offline=true", cache, *fid))
