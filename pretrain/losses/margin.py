"""Softmax over instances with an additive margin: the shared part of ArcFace and CosFace.

Every training photo is a class with a learnable unit-norm prototype (a row of ``weight``).
Logits are ``scale * cos(embedding, prototype)``; a subclass moves the true-class cosine by a
margin so that copies must sit closer to their own photo than to any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MarginSoftmax(nn.Module):
    """Cross-entropy on scaled cosine logits; subclasses set :meth:`margin_cos`."""

    def __init__(self, num_classes: int, dim: int, *, scale: float = 30.0, margin: float = 0.3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"instance softmax needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.scale = scale
        self.margin = margin

    def margin_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """The true-class cosine after the margin (identity here: plain normalised softmax)."""
        return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight, dim=1))
        cos = cos.clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        logits = cos.scatter(1, labels[:, None], self.margin_cos(target))
        return F.cross_entropy(self.scale * logits, labels)
