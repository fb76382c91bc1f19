"""Instance-level fine-tuning losses: ``loss(embeddings B x D, labels B) -> scalar``.

LOSSES maps a config name to ``factory(num_classes, dim, **params)``; labels are photo indices.
Each is a pytorch-metric-learning loss: arcface -> ArcFaceLoss, cosface -> CosFaceLoss,
triplet -> TripletMarginLoss + BatchHardMiner / BatchEasyHardMiner, infonce -> SupConLoss
(+ CrossBatchMemory); see the modules for how their parameters map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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


def check_loss(name: str, params: dict[str, Any]) -> None:
    """Build loss ``name`` with ``params`` and run it on a tiny batch, so that a bad value (a
    string for a number) fails at config load, naming the loss, not inside every run."""
    loss = build_loss(name, num_classes=2, dim=8, params=params)
    try:
        loss(torch.nn.functional.normalize(torch.randn(4, 8), dim=1), torch.tensor([0, 0, 1, 1]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"loss {name!r}: bad parameters {params}: {e}") from e


__all__ = ["LOSSES", "FullPrecision", "build_loss", "check_loss"]
