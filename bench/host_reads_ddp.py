"""Host reads and collectives per training step on 2 gloo ranks (issue 27, finding 10, with DDP).

tests/test_host_sync.py counts them in one process; this runs the same train() on two CPU ranks under
trainer.strategy=ddp, each rank counting its own (tests/host_reads.py: .item(), bool(), float(), .tolist(), .cpu(),
torch.distributed collectives and Lightning's strategy.barrier / reduce / broadcast / all_gather). A bench script,
not a test: two DDP fits of both stages take minutes on a shared CPU, past the test suite's budget.

    PYTHONPATH=. .venv/bin/python bench/host_reads_ddp.py [--steps 12] [--every 4] [--stage vae --stage ldm]

Prints one line per stage and rank (reads per step) and exits 1 if any rank reads outside the logging steps.
DDP's own gradient all-reduce runs in C++ hooks, not through torch.distributed's Python functions, so it is not
counted (it is the step's work, not a host wait).

Measured 2026-12-03 (12 steps, log every 4, both stages, both ranks): before, 2 per step outside the logging
steps on every rank, both from Lightning 2.6's loops/training_epoch_loop.py `_broadcast_sigterm_tensor` (a
dist.broadcast of rank 0's SIGTERM flag and its .item(), before every batch whenever world_size > 1): vae 90 / 86,
ldm 81 / 77 reads in 12 steps (rank 0 / 1). After ldm/train/preemption.py switched it off and agreed on SIGTERM
in its once-per-window all-reduce: vae 69 / 65, ldm 60 / 56, none outside the logging steps (2026-12-04).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Reads of host tensors on a GPU run too (the caption dropout drawn from the step's CPU generator).
HOST_SIDE = (("Tensor.tolist", "diffusion/module.py", "diffusion_loss"),)


def _overrides(stage: str, data: Path, steps: int, every: int) -> list[str]:
    common = ["logger=csv", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
              f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={every}", "trainer.limit_val_batches=0",
              "trainer.enable_progress_bar=true", "checkpoint.every_n_train_steps=1000", "data.resolution=16",
              "data.batch_size=4", "model.autoencoder.ch=16", "model.unet.model_channels=16",
              "model.unet.num_head_channels=16", "model.text_encoder.width=32", "model.text_encoder.layers=1",
              f"stage={stage}", f"data.train_shards={data}/train", f"data.val_shards={data}/val",
              "paths.exports=exports"]
    if stage == "vae":
        return [*common, "stage.module.image_log_every=0"]
    return [*common, "stage.module.scale_factor=1.0"]


def _rank(rank: int, port: int, work: str, stage: str, steps: int, every: int, out: dict) -> None:
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    from ldm.train import cli
    from tests.host_reads import HostReadCounter, counting

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), LDM_RUN_DIR=f"{work}/run_{stage}",
                      WANDB_MODE="disabled")
    os.chdir(work)
    counter = HostReadCounter(exempt=HOST_SIDE)

    class CountingTrainer(pl.Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[counter, *(callbacks or [])], **kwargs)

    cli.pl.Trainer = CountingTrainer  # this process only: a spawned rank
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=_overrides(stage, Path(work) / "shapes", steps, every))
    with counting(counter):
        cli.train(cfg)
    out[rank] = {"per_step": dict(counter.per_step), "logged_steps": sorted(set(counter.logged_steps)),
                 "sites": [(n, kind, site) for (kind, site), n in counter.sites.most_common()],
                 "exempted": dict(counter.exempted)}


def measure(stage: str, work: str, steps: int, every: int) -> dict[int, dict]:
    """Each rank's counts for `steps` steps of `stage` on 2 ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, work, stage, steps, every, out), nprocs=2, join=True)
        return dict(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="trainer.log_every_n_steps")
    parser.add_argument("--stage", action="append", choices=["vae", "ldm"])
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--sites", action="store_true", help="print where each read happened")
    args = parser.parse_args()
    stages = args.stage or ["vae", "ldm"]
    from ldm.autoencoder.model import AutoencoderKL
    from ldm.data.shapes import write_shapes

    work = tempfile.mkdtemp(prefix="host_reads_ddp_")
    write_shapes(Path(work) / "shapes", num_train=96, num_val=24, resolution=16, seed=1, shard_size=32)
    torch.manual_seed(0)
    AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=16,
                  norm_num_groups=4).save_pretrained(Path(work) / "exports" / "autoencoder")
    logging = {s for s in range(args.steps) if (s + 1) % args.every == 0}
    failed, report = False, {}
    for stage in stages:
        ranks = measure(stage, work, args.steps, args.every)
        report[stage] = ranks
        for rank in sorted(ranks):
            counts = ranks[rank]["per_step"]
            quiet = {s: n for s, n in counts.items() if s not in logging}
            numbers = [s for s in ranks[rank]["logged_steps"] if s not in logging]
            ok = not quiet and not numbers and sum(counts.values()) > 0
            failed |= not ok
            print(f"stage={stage} rank {rank}: {sum(counts.values())} host reads/collectives in {args.steps} steps "
                  f"(log every {args.every}); per step {dict(sorted(counts.items()))}; outside the logging steps "
                  f"{quiet or 'none'}; Python numbers logged outside them: {numbers or 'none'} -> "
                  f"{'ok' if ok else 'FAIL'}")
            if args.sites:
                for n, kind, site in ranks[rank]["sites"]:
                    print(f"    {n:3d} {kind} at {site}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
