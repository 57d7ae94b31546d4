"""Train a stage: `python train.py stage=vae`, then `python train.py stage=ldm`. See README.md."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ldm.train.cli import train
    from ldm.train.entry import run_reporting_errors

    run_reporting_errors(lambda: train(cfg))


if __name__ == "__main__":
    from ldm.train.ddp import apply_pinned_argv
    from ldm.train.entry import quote_shard_patterns

    apply_pinned_argv()
    sys.argv[1:] = quote_shard_patterns(sys.argv[1:])
    main()
