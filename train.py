"""Train a stage: `python train.py stage=vae`, then `python train.py stage=ldm`. See README.md."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ldm.train.checks import ConfigError
    from ldm.train.cli import train

    try:
        train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from ldm.train.ddp import apply_pinned_argv

    apply_pinned_argv()
    main()
