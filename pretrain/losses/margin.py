"""ArcFace and CosFace: softmax over training photos with an additive margin on the true class.

Both are pytorch-metric-learning losses that own a learnable class-weight matrix ``W``
(``dim x num_classes``); returned from :func:`pretrain.losses.build_loss` they become a
submodule of the fine-tuned model, so the optimiser trains ``W`` and DDP syncs it.

Config parameters keep this project's conventions: ``margin`` is in radians for ArcFace
(PML takes degrees) and both default to ``scale=30, margin=0.3`` (PML: 64 and 28.6 deg / 0.35).
"""

from __future__ import annotations

import math

from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss
from torch import nn


def arcface(num_classes: int, dim: int, *, scale: float = 30.0, margin: float = 0.3) -> nn.Module:
    """Additive angular margin: true-class logit ``scale * cos(theta + margin)``, margin in radians."""
    _check_classes(num_classes)
    return ArcFaceLoss(num_classes, dim, margin=math.degrees(margin), scale=scale)


def cosface(num_classes: int, dim: int, *, scale: float = 30.0, margin: float = 0.3) -> nn.Module:
    """Additive cosine margin: true-class logit ``scale * (cos(theta) - margin)``."""
    _check_classes(num_classes)
    return CosFaceLoss(num_classes, dim, margin=margin, scale=scale)


def _check_classes(num_classes: int) -> None:
    # with one class the softmax is constant: the run would train on a zero loss
    if num_classes < 2:
        raise ValueError(f"instance softmax needs at least 2 classes, got {num_classes}")
