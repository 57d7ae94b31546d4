"""trainer=fsdp for stage=ldm: the UNet (and its EMA copy) sharded block by block, everything frozen kept whole.

Lightning's own FSDPStrategy wraps the whole LightningModule as one unit (no wrap policy), casts every buffer
(the noise schedule, scale_factor) to the compute dtype, refuses gradient clipping by norm and cannot export
after `fit`. ShardedUNetStrategy fixes each of these:

- units: every input, middle and output block (ResBlocks with their SpatialTransformers), and the UNet, of the UNet and of its EMA copy (a
  trainable conditioner and its EMA copy are a unit each). Both copies get the same layout, so every rank
  holds the same slice of a weight and of its average: EMA.update's per-parameter lerp then runs on the local
  shards (use_orig_params=True makes `parameters()` those slices), with no gather and no communication.
- kept whole (ignored_modules): the frozen autoencoder, a frozen text tower and the metric networks. They are
  never trained, so sharding them would only add an all-gather to every encode; each rank holds them whole,
  on its device, in their own dtype.
- precision: weights gathered in bf16/fp16 for compute, gradients reduced in float32, buffers float32.
- clipping: FSDP's clip_grad_norm_ on the root (a norm over all shards), which Lightning's FSDPPrecision refuses.
- checkpoints: full state dicts (one file, as with DDP); on resume the
  modules kept whole may be absent from the file (they are rebuilt from the config). The optimizer state is
  gathered by `full_optimizer_state`, not `FSDP.optim_state_dict`: under use_orig_params torch 2.14's gather
  returns AdamW `exp_avg` values up to 2e-5 away from the ranks' own (bench/fsdp_optim_gather.py), so a
  resume started from moments no rank had.
- export: `module_for_export` gathers the full state once, on all ranks, into a plain module on rank 0.

It also runs on CPUs over gloo (Lightning refuses a CPU accelerator for `strategy=fsdp` by name, not this
subclass; torch's FSDP needs device_id=cpu there): tests/test_fsdp.py proves the above on 2 CPU ranks.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.fsdp import (
    FullStateDictConfig,
    MixedPrecision,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from ldm.checkpoints.files import load_torch_file
from ldm.diffusion.unet import TimestepEmbedSequential, UNetModel

# The UNet's blocks: each input, middle and output block (a ResBlock with its SpatialTransformer, or a
# resampler) is one all-gather in forward and one reduce-scatter in backward. Not ResBlock itself:
# TimestepEmbedSequential picks each child's arguments by its class, which an FSDP wrapper would hide.
BLOCK_CLASSES: tuple[type[nn.Module], ...] = (TimestepEmbedSequential, UNetModel)

_LOW = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
        "16-true": torch.float16, "32-true": torch.float32}


def own_units(module: nn.Module) -> list[nn.Module]:
    """Trained modules that become one FSDP unit each (beside their blocks): the UNet and a trainable conditioner,
    each with its EMA copy, so that copy and source are sharded alike."""
    units = [module.unet, module.ema.model]
    if getattr(module, "text_encoder_ema", None) is not None:
        units += [module.text_encoder, module.text_encoder_ema.model]
    return units


def kept_whole(module: nn.Module) -> list[nn.Module]:
    """Modules FSDP ignores: never trained (autoencoder, a frozen text tower) or metric networks."""
    whole = [module.autoencoder]
    if getattr(module, "text_encoder_ema", None) is None:
        whole.append(module.text_encoder)
    if getattr(module, "val_metrics", None) is not None:
        whole.append(module.val_metrics)
    return [m for m in whole if m is not None]


def wrap_policy(module: nn.Module) -> Any:
    """The auto wrap policy: the UNet's block classes and the modules of `own_units`."""
    ids = {id(m) for m in own_units(module)}
    return functools.partial(lambda_auto_wrap_policy,
                             lambda_fn=lambda m: isinstance(m, BLOCK_CLASSES) or id(m) in ids)


def fsdp_units(model: nn.Module) -> list[FSDP]:
    """Every FSDP instance under `model` (the root included)."""
    return [m for m in model.modules() if isinstance(m, FSDP)]


class ShardedPrecision(FSDPPrecision):
    """FSDPPrecision with float32 buffers and gradient reduction, autocast on the run's device type, and
    gradient clipping by norm through the root FSDP module."""

    def __init__(self, precision: Any, device_type: str = "cuda") -> None:
        super().__init__(precision)
        self.device_type = device_type
        self.root: FSDP | None = None  # set by ShardedUNetStrategy once the model is wrapped

    @property
    def mixed_precision_config(self) -> MixedPrecision:
        # Inputs are not cast: the UNet's timesteps (up to 999) would round in bf16; autocast casts per op.
        return MixedPrecision(param_dtype=_LOW[self.precision], reduce_dtype=torch.float32,
                              buffer_dtype=torch.float32, cast_forward_inputs=False, cast_root_forward_inputs=False)

    def forward_context(self) -> AbstractContextManager:
        if "mixed" in self.precision:
            return torch.autocast(self.device_type, dtype=_LOW[self.precision])
        return super().forward_context()

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        """FSDP's clip_grad_norm_: the norm of all shards of all ranks (torch's would see one rank's slice)."""
        if self.root is None:
            raise RuntimeError("gradient clipping before the model was wrapped by FSDP")
        self.root.clip_grad_norm_(clip_val)


class ShardedUNetStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with a wrap plan for LatentDiffusionModule (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(**kwargs)
        self.kwargs["use_orig_params"] = True  # EMA.update and the optimizer see per-parameter shard views

    @property
    def precision_plugin(self) -> ShardedPrecision:
        plugin = self._precision_plugin
        return plugin if plugin is not None else ShardedPrecision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if plugin is not None and not isinstance(plugin, ShardedPrecision):
            if not isinstance(plugin, FSDPPrecision):
                raise TypeError(f"trainer=fsdp needs an FSDP precision plugin, found {plugin}")
            plugin = ShardedPrecision(plugin.precision)
        self._precision_plugin = plugin

    def _setup_model(self, model: nn.Module) -> nn.Module:
        precision = self.precision_plugin
        precision.device_type = self.root_device.type
        if isinstance(model, FSDP):  # the validation after fit: wrapped already
            precision.root = model
            return model
        if not hasattr(model, "unet") or not hasattr(model, "ema"):
            raise ValueError(f"trainer=fsdp shards stage=ldm's UNet; {type(model).__name__} has none: "
                             "use trainer=ddp")
        whole = kept_whole(model)
        for part in whole:  # FSDP moves only what it manages
            part.to(self.root_device)
        kwargs = {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
        wrapped = FSDP(model, auto_wrap_policy=wrap_policy(model), ignored_modules=whole,
                       mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
                       cpu_offload=self.cpu_offload, device_id=self.root_device, **kwargs)
        check_mirrored(model)
        precision.root = wrapped
        units = fsdp_units(model.unet)
        rank_zero_info(f"[ldm] trainer=fsdp: UNet sharded in {len(units)} units over {self.world_size} ranks "
                       f"(EMA alike); kept whole: {', '.join(type(m).__name__ for m in whole)}; "
                       f"buffers float32, compute {_LOW[precision.precision]}")
        return wrapped

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The full optimizer state, keyed by parameter name, gathered exactly (see the module docstring)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        state = full_optimizer_state(self.model, optimizer)
        return state if self.global_rank == 0 else {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A full checkpoint; the modules kept whole may be missing from it (they keep their built weights,
        which is what LatentDiffusionModule.on_load_checkpoint's defaults do for DDP)."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        checkpoint = load_torch_file(path, mmap=False)  # data only: a checkpoint never runs code
        state = checkpoint["state_dict"]
        module = self.lightning_module
        whole = tuple(f"{name}." for name, child in module.named_children()
                      if any(child is m for m in kept_whole(module)))
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
            result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(whole)]
        if module.strict_loading and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states and module.trainer.state.fn == "fit":
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
                for optimizer, opt_state in zip(self.optimizers, optimizer_states, strict=True):
                    if opt_state["state"] and isinstance(next(iter(opt_state["state"])), int):
                        opt_state = FSDP.rekey_optim_state_dict(opt_state, _param_name_key(), self.model)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, opt_state))
        return checkpoint


def full_optimizer_state(model: FSDP, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of every parameter, whole, on every rank (a collective): each flat parameter's
    per-rank state shards all-gathered as they are and cut into parameters by FSDP's own flat layout.

    The format is `FSDP.optim_state_dict`'s under FULL_STATE_DICT (state and param_groups keyed by parameter
    name), so `FSDP.optim_state_dict_to_load` reads it back for any world size or wrapping.
    """
    names = {id(p): clean_tensor_name(n) for n, p in model.named_parameters()}
    local = {names[id(p)]: s for p, s in optimizer.state.items()}
    tensor_keys = sorted({k for s in local.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    scalars = {n: {k: v for k, v in s.items() if k not in tensor_keys} for n, s in local.items()}
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (tensor_keys, scalars))  # small: step counts and key names
    tensor_keys = sorted({k for keys, _ in gathered for k in keys})
    state: dict[str, dict[str, Any]] = {}
    for _, rank_scalars in gathered:
        for name, values in rank_scalars.items():
            state.setdefault(name, {}).update(values)
    for unit in fsdp_units(model):
        handle = unit._handle
        if handle is None:
            continue
        flat = handle.flat_param
        shard_numel = flat._sharded_size.numel()
        device = flat.device
        for key in tensor_keys:
            shard = torch.zeros(shard_numel, dtype=torch.float32, device=device)
            for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
                value = optimizer.state.get(param, {}).get(key)
                if info.in_shard and value is not None:
                    shard[info.offset_in_shard:info.offset_in_shard + info.numel_in_shard] = value.flatten()
            parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, shard)
            whole = torch.cat(parts)
            start, index = 0, 0
            for numel, padding in zip(flat._numels_with_padding, flat._is_padding_mask, strict=True):
                if not padding:
                    name = names[id(flat._params[index])]
                    if name in state:  # a parameter with optimizer state (trained) on some rank
                        state[name][key] = whole[start:start + numel].view(flat._shapes[index]).cpu().clone()
                    index += 1
                start += numel
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def _param_name_key() -> Any:
    from torch.distributed.fsdp import OptimStateKeyType

    return OptimStateKeyType.PARAM_NAME


def check_mirrored(module: nn.Module) -> None:
    """The EMA copies must be sharded exactly like their sources, or the local lerp mixes different weights."""
    pairs = [(module.unet, module.ema.model)]
    if getattr(module, "text_encoder_ema", None) is not None:
        pairs.append((module.text_encoder, module.text_encoder_ema.model))
    for source, copy in pairs:
        shapes = [[tuple(p.shape) for p in u.params] for u in fsdp_units(source)]
        copies = [[tuple(p.shape) for p in u.params] for u in fsdp_units(copy)]
        if shapes != copies:
            raise RuntimeError(f"FSDP sharded {type(source).__name__} and its EMA copy differently")


def module_for_export(trainer: pl.Trainer, module: pl.LightningModule) -> pl.LightningModule:
    """The module export() writes. Under ShardedUNetStrategy, a collective (call on every rank): the full state
    gathered to rank 0 into a plain module built from the same hyperparameters (no metric networks), which
    rank 0 returns; other ranks get their sharded module back. Any other strategy: `module` itself."""
    strategy = trainer.strategy
    if not isinstance(strategy, ShardedUNetStrategy) or strategy.model is None:
        return module
    state = strategy.lightning_module_state_dict()  # full on rank 0, empty elsewhere
    if not trainer.is_global_zero:
        return module
    hparams = dict(module.hparams)
    hparams["metrics"] = None
    plain = type(module)(**hparams)
    result = plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("val_metrics.")},
                                   strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"FSDP export: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return plain.eval()
