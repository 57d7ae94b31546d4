"""Metrics in float32 whatever the training precision.

Validation runs under the trainer's autocast (bf16-mixed, 16-mixed): the metric networks (LPIPS's VGG, the FID
feature extractor, CLIP) would then run their convolutions and matmuls in half precision, SSIM's Gaussian
filter too (its variance terms cancel badly in bf16), and FID returns its value in the feature dtype. Every
metric update and compute runs inside `float32_metrics`, on float32 inputs, so a bf16 run reports the numbers
a float32 run would report for the same images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def float32_metrics(device: torch.device | str) -> Iterator[None]:
    """Autocast off on `device` (the metric's inputs' device) for the duration."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
