"""Generate images from a stage=ldm checkpoint: `python sample.py prompt="a red circle on a blue background"`."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from ldm.sampling import run_sampling
    from ldm.train.checks import ConfigError

    try:
        run_sampling(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
