"""Text embeddings stored with the latents, and several captions per sample (issue 28 items 2 and 3)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.autoencoder.model import AutoencoderKL
from ldm.conditioning import build_conditioner
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder
from ldm.data.captions import pick_captions, pick_indices
from ldm.data.datamodule import ShardDataModule
from ldm.data.decode import STAT_KEYS, DecodeOptions, _caption
from ldm.data.latents import encode_shards
from ldm.data.text_embeddings import attach_stored_text, load_empty_context, tower_mismatch

from .ldm_factory import preset, tiny_ldm

TOWER = preset("text_encoder", "tiny", width=32, heads=2, layers=1)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _captioned_shards(folder: Path, num: int, per_shard: int = 6) -> dict[str, list[str]]:
    """Image shards whose samples have 1-3 captions: .txt, maybe .txt2, and a JSON list under "captions"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions: dict[str, list[str]] = {}
    for start in range(0, num, per_shard):
        with tarfile.open(folder / f"{start // per_shard:05d}.tar", "w") as tar:
            for i in range(start, min(num, start + per_shard)):
                key = f"{i:06d}"
                first, second, third = f"a photo number {i}", f"picture {i} seen again", f"image {i}, third words"
                _member(tar, f"{key}.png", _png(rng))
                _member(tar, f"{key}.txt", first.encode())
                if i % 3:
                    _member(tar, f"{key}.txt2", second.encode())
                extra = [third] if i % 2 else []
                _member(tar, f"{key}.json", json.dumps({"captions": [first, *extra], "width": 16}).encode())
                captions[key] = [first, *([second] if i % 3 else []), *extra]
    return captions


def _autoencoder(path: Path) -> Path:
    torch.manual_seed(0)
    config = preset("autoencoder", "tiny", resolution=16)
    return AutoencoderKL(**config).save_pretrained(path)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Latent shards with stored embeddings of every caption (members txt, txt2 and the json list)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text")
    captions = _captioned_shards(root / "images", num=16)
    ae = _autoencoder(root / "ae")
    calls: list[str] = []
    original = OpenCLIPTextEncoder.forward
    OpenCLIPTextEncoder.forward = lambda self, c: (calls.extend(c), original(self, c))[1]
    try:
        info = encode_shards(ae, root / "images", root / "latents", resolution=16, batch_size=8, shard_size=10,
                             progress=False, text_encoder=TOWER, caption_key=["txt", "txt2"],
                             caption_json_key="captions")
    finally:
        OpenCLIPTextEncoder.forward = original
    return root, captions, info, calls


def test_captions_from_several_members_and_from_a_json_list():
    stats = dict.fromkeys(STAT_KEYS, 0)
    sample = {"__key__": "k", "png": b"", "txt": b" first ", "txt2": b"second", "TXT3": b"first",
              "json": json.dumps({"captions": ["third", "second", ""], "caption": "x"}).encode()}
    members = DecodeOptions(resolution=8, caption_key=["txt", "txt2", "txt3"])
    fields = {k.lower(): v for k, v in sample.items()}

    assert _caption(fields, members, stats) == {"caption": "first", "captions": ["first", "second"]}
    listed = DecodeOptions(resolution=8, caption_json_key="captions")
    assert _caption(fields, listed, stats)["captions"] == ["first", "third", "second"]  # txt, then the list
    assert listed.keeps()("json") and members.keeps()("txt3") and not members.keeps()("json")
    single = DecodeOptions(resolution=8)
    assert _caption(fields, single, stats) == {"caption": "first"}  # one caption: no "captions" key
    assert stats["no_caption"] == 0 and stats["bad_caption"] == 0
    broken = {"__key__": "b", "json": b"{not json"}
    assert _caption(broken, listed, stats) == {"caption": "", "captions": [""]}
    assert stats["bad_caption"] == 1 and stats["no_caption"] == 1
    with pytest.raises(ValueError, match="data.caption_key"):
        DecodeOptions(resolution=8, caption_key=[])


def test_stored_embeddings_round_trip_each_caption_embedded_once(stored):
    root, captions, info, calls = stored
    every = [c for key in sorted(captions) for c in captions[key]]
    # each caption once, and the empty prompt once: nothing embedded twice
    assert sorted(calls) == sorted(every + [""])
    assert info["text_encoder"]["layer"] == "last" and len(info["text_encoder_sha256"]) == 64
    tower = build_conditioner(TOWER).eval()
    with torch.no_grad():
        empty = tower([""])[0].half()
    assert torch.equal(load_empty_context(root / "latents"), empty)

    dm = ShardDataModule(train_shards=str(root / "latents"), val_shards=None, resolution=16, batch_size=4,
                         num_workers=1, mode="finite", shuffle_buffer=0, latents=True,
                         caption_json_key="captions")
    dm.setup("fit")
    assert dm.text_embeddings is True  # null: read because the shards hold them
    seen = 0
    for batch in dm.train_dataloader():
        context, counts = batch["context"], batch["caption_counts"]
        assert context.dtype == torch.float16 and context.shape[:2] == (4, max(counts)) and context.ndim == 4
        for key, texts, row, n in zip(batch["key"], batch["captions"], context, counts, strict=True):
            assert texts == captions[key] and n == len(texts)
            with torch.no_grad():
                want = torch.cat([tower([t]) for t in texts]).half()
            torch.testing.assert_close(row[:n], want, rtol=0, atol=1e-3)  # the tower's float16 output
            assert not row[n:].any()  # padding
            seen += 1
    assert seen == 16


def test_caption_picks_follow_seed_step_and_rank():
    counts = [3] * 64
    assert pick_indices(counts, 0, 5, 0) == pick_indices(counts, 0, 5, 0)
    assert pick_indices(counts, 0, 5, 0) != pick_indices(counts, 0, 6, 0)
    assert pick_indices(counts, 0, 5, 0) != pick_indices(counts, 0, 5, 1)
    assert pick_indices(counts, 0, 5, 0) != pick_indices(counts, 1, 5, 0)
    assert pick_indices([1, 1], 0, 5, 0) == [0, 0]
    assert set(pick_indices(counts, 0, 5, 0)) == {0, 1, 2}

    context = torch.arange(2 * 3 * 2 * 1, dtype=torch.float16).view(2, 3, 2, 1)
    batch = {"caption": ["a0", "b0"], "captions": [["a0", "a1", "a2"], ["b0", "b1"]], "context": context,
             "caption_counts": [3, 2]}
    for step in range(6):
        texts, picked = pick_captions(batch, 0, step, 0)
        index = pick_indices([3, 2], 0, step, 0)
        assert texts == [f"a{index[0]}", f"b{index[1]}"]  # text and embedding picked together
        assert picked.dtype == torch.float32 and torch.equal(picked, context[[0, 1], index].float())


def _fit(module: pl.LightningModule, dm: ShardDataModule, steps: int) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=1, val_check_interval=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)


def test_ldm_fit_from_stored_embeddings_never_runs_the_tower(stored):
    root, *_ = stored
    calls = []

    def data(**kw):
        return ShardDataModule(train_shards=str(root / "latents"), val_shards=str(root / "latents"),
                               resolution=16, batch_size=4, num_workers=1, mode="finite", latents=True, **kw)

    module = tiny_ldm(16, text_encoder=TOWER, cond_drop_prob=0.5, model_guidance=0.5)
    module.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    dm = data(caption_json_key="captions")
    dm.check_latent_shards()
    assert attach_stored_text(module, dm)
    _fit(module, dm, steps=3)
    assert module.global_step == 3 and calls == []  # neither training nor validation steps ran the tower
    # the same fit encoding captions in the step: the hook does count those calls
    module = tiny_ldm(16, text_encoder=TOWER, cond_drop_prob=0.5)
    module.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    dm = data(text_embeddings=False)
    dm.check_latent_shards()
    assert not attach_stored_text(module, dm)
    _fit(module, dm, steps=2)
    assert len(calls) >= 2


def test_another_tower_is_refused_naming_the_key(stored):
    root, _, info, _ = stored

    def why(**change) -> str | None:
        config = {**TOWER, **change}
        return tower_mismatch(info, build_conditioner(config), config)

    assert why() is None
    assert why(layer="penultimate").startswith("model.text_encoder.layer='penultimate'")
    assert why(seed=1).startswith("model.text_encoder.seed=1")  # another random tower: other weights
    assert why(width=64, heads=2).startswith("model.text_encoder.width=64")
    assert why(freeze=False).startswith("model.text_encoder.freeze=false")
    config = dict(TOWER)
    tower = build_conditioner(config)
    with torch.no_grad():
        tower.ln_final.weight.add_(0.01)  # same settings, other weights (e.g. another checkpoint's tower)
    assert tower_mismatch(info, tower, config).startswith("data.text_embeddings: ")


def test_train_py_uses_stored_embeddings_and_stops_for_another_layer(stored):
    from .conftest import run_script
    from .test_end_to_end import TINY

    root, *_ = stored
    common = [*(o for o in TINY if not o.startswith("model.autoencoder")), "stage=ldm", "data=latents",
              f"data.train_shards={root}/latents", f"data.val_shards={root}/latents", "data.caption_json_key=captions",
              f"model.autoencoder.init_from={root}/ae", "model.text_encoder.heads=2", "model.text_encoder.layers=1",
              "paths.runs=runs", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "stage.num_val_prompts=2", "stage.module.num_inference_steps=2", "stage.module.metrics.num_samples=0"]
    proc = run_script("train.py", *common, cwd=root)
    assert "[ldm] text: stored embeddings" in proc.stdout
    summary = json.loads(next((root / "runs" / "ldm").glob("*/summary.json")).read_text())
    assert summary["global_step"] == 2
    # a start-up check like the others (freeze=false and other weights: test_another_tower_is_refused_naming_the_key)
    proc = run_script("train.py", *common, "model.text_encoder.layer=penultimate", cwd=root, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: model.text_encoder.layer='penultimate'") and "Traceback" not in proc.stderr


def test_dropped_captions_get_the_stored_empty_prompt():
    module = tiny_ldm(16, text_encoder=TOWER, cond_drop_prob=0.5)
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    empty = torch.randn(16, 32).half()  # not the tower's: shows that the stored one is used
    module.use_stored_text(empty)
    context = torch.randn(8, 16, 32)
    posterior = module.posterior({"moments": torch.zeros(8, 8, 8, 8)})
    module.diffusion_loss(posterior, [f"c{i}" for i in range(8)], step=3, context=context)
    drop = torch.rand(8, generator=module.step_generators(3)[0]) < 0.5  # the step's own dropout draw
    assert 0 < int(drop.sum()) < 8
    used = seen[0]
    assert torch.equal(used[drop], empty.float().expand(int(drop.sum()), -1, -1))
    assert torch.equal(used[~drop], context[~drop])


def test_training_step_encodes_the_picked_caption_of_each_sample():
    module = tiny_ldm(16, text_encoder=TOWER, cond_drop_prob=0.0)
    module.log = lambda *a, **k: None
    encoded = []
    module.text_encoder.register_forward_pre_hook(lambda m, args: encoded.append(list(args[0])))
    lists = [[f"s{i} caption {j}" for j in range(3)] for i in range(8)]
    batch = {"moments": torch.zeros(8, 8, 8, 8), "caption": [c[0] for c in lists], "captions": lists}
    module.training_step(batch, 0)
    index = pick_indices([3] * 8, module.hparams.seed, 0, 0)
    assert encoded == [[c[i] for c, i in zip(lists, index, strict=True)]] and set(index) != {0}
