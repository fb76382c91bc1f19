"""Instance-level fine-tuning losses: ``loss(embeddings B x D, labels B) -> scalar``.

LOSSES maps a config name to ``factory(num_classes, dim, **params)``; labels are photo indices.
Each is a pytorch-metric-learning loss: arcface -> ArcFaceLoss, cosface -> CosFaceLoss,
triplet -> TripletMarginLoss + BatchHardMiner / BatchEasyHardMiner, infonce -> SupConLoss
(+ CrossBatchMemory); see the modules for how their parameters map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pretrain.losses.infonce import infonce
from pretrain.losses.margin import arcface, cosface
from pretrain.losses.precision import FullPrecision
from pretrain.losses.triplet import triplet

LossFactory = Callable[..., nn.Module]
LOSSES: dict[str, LossFactory] = {"arcface": arcface, "cosface": cosface, "triplet": triplet, "infonce": infonce}


def build_loss(name: str, *, num_classes: int, dim: int, params: dict[str, Any] | None = None) -> nn.Module:
    """The loss ``name`` with ``params``, run in float32; errors name the loss and the bad parameter."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    try:
        loss = LOSSES[name](num_classes, dim, **(params or {}))
    except TypeError as e:
        raise ValueError(f"loss {name!r}: bad parameters {params}: {e}") from e
    return FullPrecision(loss)


__all__ = ["LOSSES", "FullPrecision", "build_loss"]
