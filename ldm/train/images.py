"""Image grids for loggers and sample files."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(canvas)


def log_image(logger: object, key: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    """Send an image to whichever logger is attached (wandb, tensorboard); others ignore it."""
    if logger is None:
        return
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[image], step=step, caption=[caption] if caption else None)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
        logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")
    elif getattr(logger, "log_dir", None):  # CSV and others: a PNG beside the metrics
        from pathlib import Path

        out = Path(logger.log_dir) / "images"
        out.mkdir(parents=True, exist_ok=True)
        image.save(out / f"{key.replace('/', '_')}_{step:07d}.png")
