"""Download every pretrained weight a run will load: `python -m ldm.prefetch [train.py overrides...]`.

Run it on a machine with internet (a login node) with the overrides the job will use; the job then runs
with `offline=true` and loads only from `paths.weights_cache`. `--check` lists what is needed and what is
missing without downloading (exit status 1 when something is missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train_config(overrides: list[str]) -> Any:
    """The config train.py would run with these overrides (same conf/ directory, same composition)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="prefetch"):
        return compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.prefetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="list needed and missing files; download nothing")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. stage=ldm model/text_encoder=openclip_vit_h14")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    from ldm.train.entry import quote_shard_patterns, run_reporting_errors
    from ldm.weights import cache_root, missing_message, needed_weights, prefetch

    try:
        cfg = compose_train_config(quote_shard_patterns(args.overrides))
    except HydraException as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[ldm] weights cache: {cache_root(cfg)} (paths.weights_cache)")
    if args.check:
        needed = needed_weights(cfg)
        for w in needed:
            print(f"[ldm] {'present' if w.present() else 'MISSING'}  {w.path}  ({w.what}; {w.key})")
        missing = [w for w in needed if not w.present()]
        if missing:
            print(missing_message(cfg, missing, args.overrides), file=sys.stderr)
        return 1 if missing else 0
    run_reporting_errors(lambda: prefetch(cfg))
    print(f"[ldm] done; on the compute node: python train.py {' '.join(args.overrides)} offline=true".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
