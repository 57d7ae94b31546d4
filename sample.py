"""Generate images from a stage=ldm checkpoint: `python sample.py prompt="a red circle on a blue background"`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from ldm.sampling import run_sampling
    from ldm.train.entry import run_reporting_errors

    run_reporting_errors(lambda: run_sampling(cfg))


if __name__ == "__main__":
    main()
