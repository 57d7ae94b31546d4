"""trainer=fsdp on 2 CPU ranks (gloo): the UNet is sharded by blocks, frozen parts stay whole, buffers stay
float32, clipping is global, the EMA equals a DDP run's, and save / resume / export carry the full EMA UNet."""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.checkpoints.bundle import EMA_WEIGHTS, write_bundle
from ldm.diffusion.unet import TimestepEmbedSequential
from ldm.train.faults import build_strategy
from ldm.train.fsdp import ShardedUNetStrategy, fsdp_units, module_for_export

from .ldm_factory import tiny_ldm

CLIP = 1e-3  # far below the gradient norm: every step is clipped


class _Latents(Dataset):
    """Precomputed posterior moments (the encoder never runs), 2 per rank: one batch per epoch.

    One batch per epoch because Lightning restarts a map-style loader's epoch on resume (see test_resume.py);
    the noise, time steps and caption dropout of each step still differ (seeded by step and rank)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"moments": torch.randn(8, 4, 4, generator=g), "caption": f"shape {i}"}


class _Probe(pl.Callback):
    """The global gradient norm after clipping, read after each optimizer step (Lightning runs the closure, and
    clips, inside optimizer.step; the gradients stay until the next closure zeroes them)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
            local = sum(p.grad.float().pow(2).sum() for g in optimizer.param_groups for p in g["params"]
                        if p.grad is not None)
            total = torch.as_tensor(local, dtype=torch.float32)
            if isinstance(trainer.strategy, ShardedUNetStrategy):  # each rank holds a slice of every gradient
                torch.distributed.all_reduce(total)
            self.norms.append(float(total.sqrt()))

        trainer.optimizers[0].register_step_post_hook(record)


class _Restart(pl.Callback):
    """The full UNet and EMA weights, the full optimizer state and the step when a resumed run starts training."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            self.unet = {k: v.detach().clone() for k, v in pl_module.unet.named_parameters()}
            self.ema = {k: v.detach().clone() for k, v in pl_module.ema.model.named_parameters()}
        self.optimizer = _full_optimizer_state(trainer.strategy)
        self.local = _local_optimizer_state(trainer.strategy)


def _local_optimizer_state(strategy: ShardedUNetStrategy) -> dict[tuple[str, str], torch.Tensor]:
    """This rank's own AdamW state shards, by (parameter name, state name): what its next step uses."""
    optimizer = getattr(strategy.optimizers[0], "_optimizer", strategy.optimizers[0])
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    return {(names[id(p)], key): torch.as_tensor(v).detach().clone() for p, entry in optimizer.state.items()
            for key, v in entry.items()}


def _full_optimizer_state(strategy: ShardedUNetStrategy) -> dict[tuple[str, str], torch.Tensor]:
    """Every (parameter name, state name) of the AdamW state, gathered whole on every rank (a collective)."""
    optimizer = getattr(strategy.optimizers[0], "_optimizer", strategy.optimizers[0])
    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
                              FullOptimStateDictConfig(rank0_only=False)):
        state = FSDP.optim_state_dict(strategy.model, optimizer)["state"]
    return {(name, key): torch.as_tensor(value).detach().clone() for name, entry in state.items()
            for key, value in entry.items()}


def _trainer(tmp: str, strategy: object, precision: str, steps: int, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision=precision, max_steps=steps,
                      gradient_clip_val=CLIP, limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp, use_distributed_sampler=False, **kwargs)


def _loader() -> DataLoader:
    """Each rank its 2 samples in a fixed order (no epoch shuffling), with a loader worker as users run; a
    persistent one, since every step is an epoch here (a worker started per step cost most of the test's time)."""
    rank = int(os.environ["RANK"])
    sampler = DistributedSampler(_Latents(), num_replicas=2, rank=rank, shuffle=False)
    return DataLoader(_Latents(), batch_size=2, sampler=sampler, num_workers=1, persistent_workers=True)


def _module() -> pl.LightningModule:
    torch.manual_seed(0)
    return tiny_ldm(lr=1e-3, ema_decay=0.5, num_inference_steps=2)


def _full_ema(strategy: object, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The EMA UNet's full weights, on every rank."""
    if isinstance(strategy, ShardedUNetStrategy):
        with FSDP.summon_full_params(strategy.model, writeback=False):
            return {k: v.detach().clone() for k, v in module.ema.model.named_parameters()}
    return {k: v.detach().clone() for k, v in module.ema.model.named_parameters()}


def _worker(rank: int, port: int, tmp: str, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    result: dict = {"seconds": []}
    start = time.time()
    # 1. bf16-mixed, as users run it: units, frozen parts whole, float32 buffers, global clipping.
    module, probe = _module(), _Probe()
    ae_shapes = [tuple(p.shape) for p in module.autoencoder.parameters()]
    strategy = build_strategy("fsdp", 60)
    _trainer(tmp, strategy, "bf16-mixed", 2, callbacks=[probe]).fit(module, _loader())
    blocks = sum(isinstance(m, TimestepEmbedSequential) for m in module.unet.modules())
    result["blocks"] = blocks
    result["unet_params"] = sum(1 for _ in _module().unet.parameters())  # unwrapped: every parameter by name
    result["unet_units"] = len(fsdp_units(module.unet))
    result["ema_units"] = len(fsdp_units(module.ema.model))
    result["whole"] = (not fsdp_units(module.autoencoder) and not fsdp_units(module.text_encoder)
                       and [tuple(p.shape) for p in module.autoencoder.parameters()] == ae_shapes)
    result["buffers"] = {str(b.dtype) for b in (module.schedule.alphas_cumprod, module.scale_factor)}
    result["norms"] = probe.norms
    result["seconds"].append(round(time.time() - start, 1))
    # 2. float32, 4 steps, saved (every rank: a collective; rank 0 writes the full state).
    module = _module()
    strategy = build_strategy("fsdp", 60)
    trainer = _trainer(tmp, strategy, "32-true", 4)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(f"{tmp}/step4.ckpt")
    sharded = _full_ema(strategy, module)
    saved_optimizer = _full_optimizer_state(strategy)
    saved_local = _local_optimizer_state(strategy)
    result["updates"] = int(module.ema.num_updates)
    images = module.generate(["shape 1"], seed=3)  # outside any forward: the EMA units gather themselves
    # 3. Resumed on a fresh model: the UNet and EMA weights when training restarts are the saved ones.
    restart = _Restart()
    again = build_strategy("fsdp", 60)
    _trainer(tmp, again, "32-true", 5, callbacks=[restart]).fit(_module(), _loader(), ckpt_path=f"{tmp}/step4.ckpt")
    with FSDP.summon_full_params(strategy.model, writeback=False):
        unet = {k: v.detach().clone() for k, v in module.unet.named_parameters()}
    result["resume_diff"] = max(max((restart.ema[k] - sharded[k]).abs().max().item() for k in sharded),
                                max((restart.unet[k] - unet[k]).abs().max().item() for k in unet))
    result["resume_step"] = restart.step
    result["optimizer_keys"] = (len(saved_optimizer), set(saved_optimizer) == set(restart.optimizer),
                                {key for _, key in saved_optimizer})
    result["optimizer_diff"] = max((restart.optimizer[k].double() - v.double()).abs().max().item()
                                   for k, v in saved_optimizer.items() if k in restart.optimizer and v.numel())
    result["local_keys"] = (len(saved_local), set(saved_local) == set(restart.local))
    result["local_diff"] = max((restart.local[k].double() - v.double()).abs().max().item()
                               for k, v in saved_local.items() if k in restart.local and v.numel())
    result["optimizer_moved"] = max(v.abs().max().item() for (_, key), v in saved_optimizer.items()
                                    if key == "exp_avg" and v.numel())
    result["seconds"].append(round(time.time() - start, 1))
    # 4. The reference: DDP (every weight whole on every rank), the same 4 steps.
    reference = _module()
    ddp = build_strategy("ddp", 60)
    _trainer(tmp, ddp, "32-true", 4).fit(reference, _loader())
    unsharded = _full_ema(ddp, reference)
    result["ema_vs_ddp"] = max((sharded[k] - unsharded[k]).abs().max().item() for k in unsharded)
    result["ema_moved"] = max((unsharded[k] - p).abs().max().item()
                              for k, p in _module().ema.model.named_parameters())
    result["seconds"].append(round(time.time() - start, 1))
    # 5. Export: the full state gathered once, a plain module on rank 0.
    plain = module_for_export(trainer, module)
    if rank == 0:
        bundle = write_bundle(plain, f"{tmp}/export", outside_layouts=False)
        exported = load_file(str(bundle / EMA_WEIGHTS))
        result["export_diff"] = max((exported[k] - sharded[k]).abs().max().item() for k in sharded)
        result["export_keys"] = set(exported) >= set(sharded)
        result["image_diff"] = (plain.generate(["shape 1"], seed=3) - images).abs().max().item()
    out[rank] = result


@pytest.mark.usefixtures("one_thread")
def test_fsdp_shards_the_unet_and_matches_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, str(tmp_path), out), nprocs=2, join=True)
        results = dict(out)
    r0, r1 = results[0], results[1]
    # The UNet and its EMA copy: one unit per input / middle / output block plus the UNet itself.
    assert r0["unet_units"] == r0["ema_units"] == r0["blocks"] + 1 > 3, r0
    assert r0["whole"] and r1["whole"]
    assert r0["buffers"] == {"torch.float32"}, r0["buffers"]
    assert len(r0["norms"]) == 2 and all(n == pytest.approx(CLIP, rel=1e-3) for n in r0["norms"]), r0["norms"]
    assert r0["updates"] == 4
    assert r0["ema_moved"] > 1e-3  # the comparison below compares weights that trained
    assert r0["ema_vs_ddp"] < 1e-5 and r1["ema_vs_ddp"] < 1e-5, (r0["ema_vs_ddp"], r1["ema_vs_ddp"])
    # Resume: the saved full state lands back in the shards exactly (the EMA's update count with it).
    assert r0["resume_step"] == 4 and r0["resume_diff"] == 0.0 and r1["resume_diff"] == 0.0, (r0, r1)
    # ... and so does the AdamW state (moments and step count of every UNet parameter), gathered whole, and each
    # rank's own shards of it, which its next step uses: FSDP.optim_state_dict's gather of exp_avg differs from
    # those by up to 2e-5 (bench/fsdp_optim_gather.py), so ldm.train.fsdp gathers the shards itself.
    count, same_keys, names = r0["optimizer_keys"]
    assert same_keys and names == {"step", "exp_avg", "exp_avg_sq"} and count == 3 * r0["unet_params"], r0
    assert r0["optimizer_moved"] > 0.0  # moments that trained
    assert r0["optimizer_diff"] == 0.0 and r1["optimizer_diff"] == 0.0, (r0["optimizer_diff"], r1["optimizer_diff"])
    assert r0["local_keys"][1] and r1["local_keys"][1] and r0["local_keys"][0] > 0, (r0["local_keys"], r1["local_keys"])
    assert r0["local_diff"] == 0.0 and r1["local_diff"] == 0.0, (r0["local_diff"], r1["local_diff"])
    assert r0["export_keys"] and r0["export_diff"] < 1e-6, r0
    assert r0["image_diff"] < 1e-4, r0["image_diff"]
    print("seconds per phase (rank 0):", r0["seconds"])
