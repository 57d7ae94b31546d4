"""Class-conditional and unconditional conditioners, interchangeable with the text encoder.

Every conditioner maps a list of strings (captions, or class labels read from the shards as text, e.g.
`data.caption_key=cls`) to cross-attention context, and maps "" to the unconditional input, so caption
dropout and classifier-free guidance work the same way in all three modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.nn.transfer import to_device


class ClassEmbedder(nn.Module):
    """A learned embedding per class as a single context token: the paper's class-conditional ImageNet
    LDM (cross-attention to the class embedding). Index `num_classes` is the learned "no class" token."""

    def __init__(self, num_classes: int, embed_dim: int = 512, class_names: Sequence[str] | None = None,
                 freeze: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.text_encoder.num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.text_encoder.class_names has {len(class_names)} names for "
                             f"num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self._index = {name: i for i, name in enumerate(self.class_names or [])}
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.output_dim = embed_dim
        self.embedding.requires_grad_(not freeze)  # freeze: fixed random class vectors (as a frozen text tower)

    def labels(self, labels: Sequence[str | int]) -> torch.Tensor:
        """Class names or integer labels (as ints or text) -> indices; "" is the unconditional index."""
        out = []
        for label in labels:
            text = str(label).strip()
            if text == "":
                out.append(self.num_classes)
            elif text in self._index:
                out.append(self._index[text])
            elif text.lstrip("-").isdigit() and 0 <= int(text) < self.num_classes:
                out.append(int(text))
            else:
                raise ValueError(f"class label {label!r} is neither a class name nor an integer in "
                                 f"[0, {self.num_classes})")
        return to_device(torch.tensor(out, dtype=torch.long), self.embedding.weight.device)  # asynchronous to a GPU

    def forward(self, labels: Sequence[str | int]) -> torch.Tensor:
        return self.embedding(self.labels(labels))[:, None, :]


class Unconditional(nn.Module):
    """No conditioning: the UNet is built without cross-attention context and guidance is a no-op."""

    output_dim = None

    def forward(self, labels: Sequence[str]) -> None:
        return None
