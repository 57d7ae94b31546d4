"""What a GPU run hits outside the training step: collectives after `fit`, EMA per optimizer step, validation
with more ranks than prompts, and the parts sampling must not build (issue 27).

On a GPU node Lightning moves the module back to the CPU when `fit` ends, and NCCL refuses CPU tensors. On the
CPU both devices are the same, so these tests put the module on another device ('meta') than the strategy's
root device, and a stand-in strategy checks where the tensors it is handed live.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from ldm.checkpoints.files import load_torch_file
from ldm.data.callbacks import DataStatsCallback
from ldm.data.decode import STAT_KEYS
from ldm.train.cli import optimizer_steps_per_rank


class _Strategy:
    """Two ranks that hold the same values; records the device of every tensor handed to a collective."""

    root_device = torch.device("cpu")

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.devices.append(tensor.device)
        return torch.stack([tensor, tensor]) if tensor.device.type != "meta" else torch.zeros(2, *tensor.shape)

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        self.devices.append(tensor.device)
        return tensor * 2 if tensor.device.type != "meta" else torch.zeros_like(tensor, device="cpu")


class _CountingModule(pl.LightningModule):
    """Keeps `optimizer_steps` like AutoencoderModule does."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.optimizer_steps = [3, 2]


def test_steps_per_rank_gathers_on_the_root_device_after_fit():
    """After fit the module is on another device than the strategy's (the CPU on a GPU node): the gathered
    tensor must still be on the strategy's root device."""
    module = _CountingModule().to("meta")  # not the root device, as the CPU is not a GPU node's
    strategy = _Strategy()
    trainer = SimpleNamespace(strategy=strategy, interrupted=False)
    assert optimizer_steps_per_rank(trainer, module) == [[3, 2], [3, 2]]
    assert strategy.devices == [strategy.root_device]


def test_data_stats_sum_on_the_root_device():
    """The twin in the data-count callback: its reduce takes a tensor on the strategy's root device."""
    module = _CountingModule().to("meta")
    strategy = _Strategy()
    trainer = SimpleNamespace(strategy=strategy)
    callback = DataStatsCallback(every_n_batches=1, min_samples=10**9)
    callback.pending += 1
    module.log_dict = lambda *args, **kwargs: None  # no trainer loop to log into here
    totals = callback.sync(trainer, module)
    assert strategy.devices == [strategy.root_device]
    assert totals == {key: 2 for key in STAT_KEYS}


def test_ema_updates_once_per_optimizer_step(tmp_path):
    """accumulate_grad_batches=2: 4 batches are 2 optimizer steps, so the UNet's and the trainable text tower's
    EMA average twice (decay d, not d^2) and the warm-up counts 2."""
    from torch.utils.data import DataLoader

    from tests.ldm_factory import preset, tiny_ldm

    torch.manual_seed(0)
    text = preset("text_encoder", "tiny", width=32, heads=2, layers=1, freeze=False)
    module = tiny_ldm(text_encoder=text)
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "caption": "a red circle"} for _ in range(8)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(images, batch_size=2))
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert int(module.ema.num_updates) == 2
    assert int(module.text_encoder_ema.num_updates) == 2
    assert module.ema.current_decay() == min(0.9, 3 / 12)  # the warm-up after 2 steps


def _validate_main(out: str, world: int) -> None:
    """Run in a fresh interpreter: `world` CPU ranks over gloo validate a tiny model with 2 prompts."""
    import json
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from ldm.data.shapes import prompt_set
    from tests.ldm_factory import tiny_ldm

    torch.set_num_threads(1)
    prompts = prompt_set(2, seed=0)
    module = tiny_ldm(val_prompts=prompts, score_shapes=True)
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "caption": prompts[i % 2]} for i in range(2 * world)]
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=120))  # a busy machine starts slowly
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.validate(module, DataLoader(images, batch_size=2), verbose=False)
    if trainer.is_global_zero:
        from ldm.data.analyze import prompt_accuracy

        # The same prompts and seeds in one process: what the mean over the ranks' real prompts must be.
        alone = prompt_accuracy(module.generate(prompts, seeds=[0, 1]).cpu(), prompts)
        logged = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items() if "prompt_accuracy" in k}
        with open(f"{out}/result.json", "w") as f:
            json.dump({"logged": logged, "alone": alone}, f)


def test_more_ranks_than_validation_prompts(ddp_children):
    """3 ranks, 2 validation prompts: the third rank has none of its own. It pads (its images dropped), so no
    rank calls generate([]) while the others wait in the metric sync, and the logged accuracy is the 2 prompts'."""
    result = _finish(ddp_children["validate"])
    assert result["logged"] and set(result["logged"]) == set(result["alone"])
    for key, value in result["alone"].items():
        assert abs(result["logged"][key] - value) < 1e-6, (key, result)


def test_final_validation_runs_once(tmp_path, tiny_shapes, monkeypatch, one_thread):
    """max_steps=2 with val_check_interval=2: fit validates at step 2, so train() must not validate again; its
    summary still holds that validation's metrics."""
    import json

    from ldm.autoencoder.module import AutoencoderModule
    from ldm.train.cli import train
    from tests.test_prefetch import compose_train

    seen: list[int] = []
    real = AutoencoderModule.on_validation_epoch_end

    def counting(self):
        if not self.trainer.sanity_checking:
            seen.append(self.global_step)
        return real(self)

    monkeypatch.setattr(AutoencoderModule, "on_validation_epoch_end", counting)
    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    cfg = compose_train("logger=csv", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2",
                        "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                        "+trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                        "data.resolution=16", "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0",
                        "model.autoencoder.ch=16", f"data.train_shards={tiny_shapes}/train",
                        f"data.val_shards={tiny_shapes}/val", f"paths.runs={tmp_path}/runs",
                        f"paths.exports={tmp_path}/exports")
    train(cfg)
    assert seen == [2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "val/psnr" in summary["metrics"], summary


def _penultimate_main(out: str) -> None:
    """Run in a fresh interpreter: 2 CPU ranks over gloo train a tiny model whose trainable text tower reads its
    penultimate block, with DDP's find_unused_parameters=False (what stage=ldm runs with)."""
    import json
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from tests.ldm_factory import preset, tiny_ldm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = preset("text_encoder", "tiny", width=32, heads=2, layers=2, freeze=False, layer="penultimate")
    module = tiny_ldm(text_encoder=text, cond_drop_prob=0.0)
    blocks = module.text_encoder.transformer.resblocks
    before = [torch.cat([p.detach().flatten() for p in b.parameters()]).clone() for b in blocks]
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "caption": f"caption {i}"} for i in range(12)]
    strategy = DDPStrategy(start_method="fork", find_unused_parameters=False, timeout=timedelta(seconds=120))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=out)
    trainer.fit(module, DataLoader(images, batch_size=2))
    if trainer.is_global_zero:
        after = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in blocks]
        with open(f"{out}/result.json", "w") as f:
            # The launcher hands the trained weights back to this process (not the trainer's counters).
            json.dump({"finished": trainer.state.finished,
                       "changed": [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]}, f)


def _start(tmp_path, main: str, *args):
    """`main(tmp_path, *args)` in a fresh interpreter, which forks the ranks; returns (process, tmp_path)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    call = ", ".join(repr(a) for a in (str(tmp_path), *args))
    code = f"from tests.test_gpu_lifecycle import {main}; {main}({call})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
    return proc, tmp_path


def _finish(started, timeout: float = 300) -> dict:
    import json

    proc, tmp_path = started
    code = proc.wait(timeout=timeout)
    assert code == 0, (tmp_path / "stderr").read_text()[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module")
def ddp_children(tmp_path_factory):
    """This file's two multi-rank runs, started together: each spends its first ~10 s importing on one core, so
    side by side they use both cores of a 2-core CI machine. Each test waits for its own."""
    started = {"validate": _start(tmp_path_factory.mktemp("validate"), "_validate_main", 3),
               "penultimate": _start(tmp_path_factory.mktemp("penultimate"), "_penultimate_main")}
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trainable_penultimate_text_tower_under_ddp(ddp_children):
    """freeze=false with layer=penultimate on 2 ranks: DDP gets past step 2; the blocks that run train, the
    last block (never run) stays as it was and out of DDP's reducer."""
    result = _finish(ddp_children["penultimate"])
    assert result == {"finished": True, "changed": [True, False]}


def test_sampling_and_export_never_build_the_metric_networks(tmp_path, monkeypatch, one_thread):
    """A checkpoint trained with FID on: sample.py (from the .ckpt and from its export) and `python -m
    ldm.export` build no metric network (on an offline node FID's Inception would be downloaded); the export
    still records the metrics settings it was trained with."""
    import json

    import ldm.diffusion.module as diffusion_module
    from ldm.checkpoints.bundle import BUNDLE_CONFIG
    from ldm.export import export_checkpoint
    from tests.ldm_factory import tiny_ldm
    from tests.test_sample import run

    metrics = {"num_samples": 4, "fid": {"extractor": "small", "num_features": 8}, "clip_score": {"enabled": False}}
    module = tiny_ldm(metrics=metrics)
    assert module.val_metrics is not None
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(checkpoint)  # what Lightning's save does
    torch.save(checkpoint, tmp_path / "last.ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("a metric network was built outside training")

    monkeypatch.setattr(diffusion_module, "GenerationMetrics", refuse)
    run(tmp_path / "from_ckpt", f"ckpt={tmp_path / 'last.ckpt'}", "prompt=a red circle", "height=8", "width=8")
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "bundle")
    run(tmp_path / "from_bundle", f"ckpt={tmp_path / 'bundle'}", "prompt=a red circle", "height=8", "width=8")
    assert (tmp_path / "from_bundle" / "00000.png").is_file()
    assert json.loads((tmp_path / "bundle" / BUNDLE_CONFIG).read_text())["module"]["metrics"] == metrics


def test_stage2_autoencoder_runs_in_float32_under_16_mixed(one_thread):
    """16-mixed: the frozen autoencoder encodes and decodes in float32 (no float16 overflow); bf16 keeps autocast."""
    from tests.ldm_factory import tiny_ldm

    module = tiny_ldm().eval()
    seen: list[torch.dtype] = []
    for conv in [m for m in module.autoencoder.modules() if isinstance(m, torch.nn.Conv2d)]:
        conv.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.float16):
        z = module.posterior({"image": image}).mode()
        images = module.decode_latents(z.half())
    assert seen and set(seen) == {torch.float32}, set(seen)
    assert z.dtype == images.dtype == torch.float32
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.posterior({"image": image})
    assert set(seen) == {torch.bfloat16}


def _published_tiny_tower(tmp_path) -> dict:
    """A frozen 'published' OpenCLIP tower (model_name + pretrained), served from a local file: a tiny model
    config registered with open_clip and random weights saved where `pretrained` points."""
    import json

    import open_clip

    name = "ldm-test-tiny-clip"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(7)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return {"kind": "openclip", "model_name": name, "pretrained": str(weights), "freeze": True}


def test_checkpoints_leave_out_a_published_frozen_text_tower(tmp_path, one_thread):
    """The frozen published tower is not stored (only its fingerprint); resuming from such a checkpoint is
    bit-equal to an uninterrupted run, an old checkpoint that holds the tower still loads, and a tower that
    is not the one trained with is refused."""
    from torch.utils.data import DataLoader

    from ldm.diffusion.module import LatentDiffusionModule
    from tests.ldm_factory import tiny_ldm

    text = _published_tiny_tower(tmp_path)
    images = [{"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1,
               "caption": f"caption {i}"} for i in range(4)]

    def fit(steps: int, ckpt: str | None = None) -> tuple[LatentDiffusionModule, pl.Trainer]:
        torch.manual_seed(0)
        module = tiny_ldm(text_encoder=text)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, limit_val_batches=0,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path))
        trainer.fit(module, DataLoader(images, batch_size=2), ckpt_path=ckpt)
        return module, trainer

    first, trainer = fit(2)  # one epoch of 2 batches: the resumed run starts the next epoch, as the full one does
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    saved = load_torch_file(path)
    assert not [k for k in saved["state_dict"] if k.startswith("text_encoder.")]
    assert saved["text_encoder_fingerprint"][0] > 0 and any(k.startswith("unet.") for k in saved["state_dict"])
    resumed, _ = fit(3, str(path))
    whole, _ = fit(3)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key

    old = dict(saved, state_dict={**saved["state_dict"], **{f"text_encoder.{k}": v for k, v in
                                                          first.text_encoder.state_dict().items()}})
    del old["text_encoder_fingerprint"]
    torch.save(old, tmp_path / "old.ckpt")
    loaded = LatentDiffusionModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert torch.equal(loaded.text_encoder.token_embedding.weight, first.text_encoder.token_embedding.weight)

    saved["text_encoder_fingerprint"][1] += 1.0  # as if another tower were built from the config
    torch.save(saved, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not the one this checkpoint was trained with"):
        LatentDiffusionModule.load_from_checkpoint(tmp_path / "other.ckpt", map_location="cpu")


def test_a_periodic_checkpoint_holds_that_steps_ema(tmp_path, tiny_shapes, monkeypatch, one_thread):
    """Lightning saves ModelCheckpoint's periodic file before the module's on_train_batch_end: unless train()
    updates the EMA first, step N's checkpoint holds N-1 averages and a resume from it loses one for good."""
    from ldm.train.cli import train
    from tests.test_prefetch import compose_train

    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    cfg = compose_train("stage=ldm", "model/autoencoder=identity", "logger=csv", "trainer.accelerator=cpu",
                        "trainer.devices=1", "trainer.max_steps=3", "trainer.limit_val_batches=0",
                        "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2",
                        "stage.module.metrics.num_samples=0", "data.resolution=16", "data.batch_size=4",
                        "data.num_workers=0", "model.unet.model_channels=32", "model.unet.num_head_channels=16",
                        "model.text_encoder.width=32", f"data.train_shards={tiny_shapes}/train",
                        f"data.val_shards={tiny_shapes}/val", f"paths.runs={tmp_path}/runs", "paths.exports=nowhere")
    train(cfg)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step0000002.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert int(saved["state_dict"]["ema.num_updates"]) == 2  # not 1 (saved before the update), not 3 (twice)


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_gradient_clipping_under_bf16_mixed_with_fused_adamw(stage, tmp_path, tiny_shapes, monkeypatch, one_thread):
    """The shapes and fine-tune recipes clip (trainer.gradient_clip_val); users train in bf16-mixed; AdamW is fused.
    Lightning's AMP plugin refuses to clip for a fused optimizer: the step must clip instead, to the bound."""
    from ldm.train.cli import train
    from ldm.train.optim import clip_gradients as real_clip
    from tests.test_prefetch import compose_train

    norms: list[float] = []

    def recording(module, optimizer, clip_val, algorithm="norm"):
        assert optimizer.defaults.get("fused"), "the test needs a fused AdamW"
        real_clip(module, optimizer, clip_val, algorithm)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    target = "ldm.diffusion.module" if stage == "ldm" else "ldm.autoencoder.module"
    monkeypatch.setattr(f"{target}.clip_gradients", recording, raising=False)  # absent before the fix
    monkeypatch.setenv("LDM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    model = (["model/autoencoder=identity", "model.unet.model_channels=32", "model.unet.num_head_channels=16",
              "model.text_encoder.width=32", "stage.module.metrics.num_samples=0", "paths.exports=nowhere"]
             if stage == "ldm" else ["model.autoencoder.ch=16", f"paths.exports={tmp_path}/exports",
                                     "stage.module.loss.perceptual_weight=0"])
    cfg = compose_train(f"stage={stage}", *model, "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1",
                        "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                        "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1e-3", "data.resolution=16",
                        "data.batch_size=4", "data.num_workers=0", f"data.train_shards={tiny_shapes}/train",
                        f"data.val_shards={tiny_shapes}/val", f"paths.runs={tmp_path}/runs")
    train(cfg)
    assert norms and all(n <= 1e-3 * 1.01 for n in norms), norms
