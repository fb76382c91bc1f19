"""Instance-level fine-tuning losses: ``loss(embeddings B x D, labels B) -> scalar``.

LOSSES maps a config name to ``factory(num_classes, dim, **params)``; labels are photo indices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pretrain.losses.arcface import ArcFaceLoss
from pretrain.losses.cosface import CosFaceLoss
from pretrain.losses.infonce import InfoNCELoss
from pretrain.losses.mining import (
    hardest_negatives,
    hardest_positives,
    pairwise_distances,
    semi_hard_negatives,
)
from pretrain.losses.triplet import TripletLoss

LossFactory = Callable[..., nn.Module]
LOSSES: dict[str, LossFactory] = {
    "arcface": lambda num_classes, dim, **kw: ArcFaceLoss(num_classes, dim, **kw),
    "cosface": lambda num_classes, dim, **kw: CosFaceLoss(num_classes, dim, **kw),
    "triplet": lambda num_classes, dim, **kw: TripletLoss(**kw),
    "infonce": lambda num_classes, dim, **kw: InfoNCELoss(dim, **kw),
}


def build_loss(name: str, *, num_classes: int, dim: int, params: dict[str, Any] | None = None) -> nn.Module:
    """The loss ``name`` with ``params``; errors name the loss and the bad parameter."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    try:
        return LOSSES[name](num_classes, dim, **(params or {}))
    except TypeError as e:
        raise ValueError(f"loss {name!r}: bad parameters {params}: {e}") from e


__all__ = [
    "LOSSES", "ArcFaceLoss", "CosFaceLoss", "InfoNCELoss", "TripletLoss", "build_loss",
    "hardest_negatives", "hardest_positives", "pairwise_distances", "semi_hard_negatives",
]
