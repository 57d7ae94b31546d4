"""EMA under DDP: every rank averages the same synchronized weights, so the EMA copies agree exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ldm.diffusion.ema import EMA

STEPS = 3


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
        ema = EMA(model, decay=0.9)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(STEPS):
            loss = ddp(torch.randn(5, 8, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
        flat = torch.cat([p.detach().flatten() for p in ema.model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        out[rank] = {"equal": all(torch.equal(g, gathered[0]) for g in gathered),
                     "moved": not torch.equal(flat, start), "updates": int(ema.num_updates)}
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_ema_copies_agree_across_ranks(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0]["equal"] and results[1]["equal"] and results[0]["moved"]
    assert results[0]["updates"] == results[1]["updates"] == STEPS
