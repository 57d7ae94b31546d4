"""Host-built tensors (token ids, class indices) onto the model's device without a synchronisation."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To a GPU it goes through pinned memory as an asynchronous copy: from pageable
    memory the host would wait for every kernel queued before it (PyTorch's pinned allocator keeps the buffer
    until the copy is done)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
