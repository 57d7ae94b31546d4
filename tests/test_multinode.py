"""A simulated 2-node x 1-device DDP job on localhost: two processes with NODE_RANK 0 and 1 meeting at one
MASTER_ADDR/MASTER_PORT, as the ranks of a multi-node SLURM job do. Each node's rank reads a disjoint set of
shards, together all of them.

Run as a script, this file is one node's process (see `node_main`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE, SHARDS, BATCH, STEPS = 16, 4, 8, 4


def node_main(shards: str, out: str) -> None:
    """One node with one CPU device: fit a trivial model on ShardDataModule batches and record their keys."""
    import pytorch_lightning as pl
    import torch

    from ldm.data.datamodule import ShardDataModule

    torch.set_num_threads(1)

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.keys: list[str] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.keys += list(batch["key"])
            return self.layer(batch["image"].mean(dim=(1, 2, 3))[:, None]).pow(2).mean()

        def on_train_end(self) -> None:
            record = {"global_rank": self.global_rank, "node_rank": self.trainer.node_rank,
                      "world_size": self.trainer.world_size, "keys": self.keys}
            Path(out, f"rank{self.global_rank}.json").write_text(json.dumps(record))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = ShardDataModule(train_shards=shards, val_shards=None, resolution=16, batch_size=BATCH, num_workers=2,
                           mode="resampled", epoch_length=STEPS, shuffle_buffer=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0)
    trainer.fit(Recorder(), datamodule=data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_read_disjoint_shards(tmp_path):
    from ldm.data.shapes import write_shapes

    write_shapes(tmp_path / "data", num_train=SHARD_SIZE * SHARDS, num_val=8, resolution=16, seed=2,
                 shard_size=SHARD_SIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK"))}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT)})
    nodes = [subprocess.Popen([sys.executable, __file__, str(tmp_path / "data" / "train"), str(tmp_path)],
                              env={**env, "NODE_RANK": str(rank)}, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in records] == [(0, 0, 2), (1, 1, 2)]
    shards_read = [{int(key) // SHARD_SIZE for key in r["keys"]} for r in records]
    assert all(len(r["keys"]) == STEPS * BATCH for r in records)  # equal batches per rank
    assert shards_read[0].isdisjoint(shards_read[1]), shards_read
    assert shards_read[0] | shards_read[1] == set(range(SHARDS)), shards_read
    # Shards dealt round-robin over every loader worker of every rank (rank * num_workers + worker): with two
    # workers per rank, shards 0 and 1 go to rank 0's workers and 2 and 3 to rank 1's.
    assert shards_read == [{0, 1}, {2, 3}]


if __name__ == "__main__":
    node_main(sys.argv[1], sys.argv[2])
