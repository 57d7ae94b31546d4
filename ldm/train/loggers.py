"""Logger construction: wandb (offline when no API key), CSV or TensorBoard, all inside the run dir."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_logger(cfg: dict[str, Any], run_dir: Path, run_name: str) -> Logger | None:
    name = cfg.get("name", "wandb")
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="logs")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    if name == "none":
        return None
    if name != "wandb":
        raise ValueError(f"logger: unknown logger {name!r}; choose wandb, csv, tensorboard or none")
    mode = cfg.get("mode", "auto")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        if mode == "offline":
            print(f"[ldm] wandb: no API key configured, logging offline under {run_dir}/wandb; "
                  f"sync later with: wandb sync {run_dir}/wandb/offline-run-*")
    return WandbLogger(project=cfg.get("project", "ldm"), entity=cfg.get("entity"), name=run_name,
                       save_dir=str(run_dir), offline=(mode == "offline"), mode=mode if mode == "disabled" else None)
