"""Logger construction: wandb (offline when no API key), CSV or TensorBoard, all inside the run dir."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from ldm.errors import ConfigError


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_run_id(run_dir: Path, resume_from: str | None) -> str:
    """One wandb run per training run: a resumed run reuses the id stored in the run dir it resumes from.

    Only global rank 0 writes the file (the other ranks never log), so DDP ranks cannot race on it.
    """
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    candidates = [run_dir / "wandb_run_id"]
    if resume_from:
        candidates.insert(0, Path(resume_from).resolve().parent.parent / "wandb_run_id")
    for path in candidates:
        if path.is_file() and path.read_text().strip():
            run_id = path.read_text().strip()
            break
    else:
        import secrets

        run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase alphanumerics too
    if getattr(rank_zero_only, "rank", 0) == 0:
        (run_dir / "wandb_run_id").write_text(run_id + "\n")
    return run_id


def make_logger(cfg: dict[str, Any], run_dir: Path, run_name: str, resume_from: str | None = None
                ) -> Logger | None:
    name = cfg.get("name", "wandb")
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="logs")
    if name == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                              "(make installs it), or use logger=csv / logger=wandb")
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    if name == "none":
        return None
    if name != "wandb":
        raise ConfigError(f"logger: unknown logger {name!r}; choose wandb, csv, tensorboard or none")
    mode = cfg.get("mode", "auto")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        if mode == "offline":
            print(f"[ldm] wandb: no API key configured, logging offline under {run_dir}/wandb; "
                  f"sync later with: wandb sync {run_dir}/wandb/offline-run-*")
    if mode == "disabled":
        return WandbLogger(project=cfg.get("project", "ldm"), save_dir=str(run_dir), mode="disabled")
    return WandbLogger(project=cfg.get("project", "ldm"), entity=cfg.get("entity"), name=run_name,
                       save_dir=str(run_dir), offline=(mode == "offline"), id=wandb_run_id(run_dir, resume_from),
                       resume="allow")
