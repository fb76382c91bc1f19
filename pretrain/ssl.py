"""BYOL (Grill et al. 2020) around a copydet descriptor backbone, from lightly's parts.

Online: backbone -> BYOLProjectionHead -> BYOLPredictionHead; target: momentum copies of the
backbone and projection head (no gradients), updated by ``update_momentum`` with a cosine
schedule from ``momentum[0]`` to 1. Loss: symmetric NegativeCosineSimilarity.

Example::

    byol = BYOL(build_backbone("resnet18", dim=256), proj_hidden=1024, proj_dim=128, pred_hidden=1024)
    opt = torch.optim.SGD(byol.trainable_parameters(), lr=0.05)
    loss = byol(view0, view1)            # forward = loss (DDP syncs the online gradients)
    loss.backward(); opt.step(); opt.zero_grad()
    byol.update_target(momentum_at(step, total_steps, 0.99))
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from core.models.backbones import DescriptorModel


def representation(backbone: DescriptorModel, x: torch.Tensor) -> torch.Tensor:
    """The backbone's descriptor before L2 normalisation (BYOL heads work on the raw vector)."""
    return backbone.proj(backbone.pool(backbone.trunk.forward_features(x)))


def momentum_at(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Target EMA momentum at ``step``: cosine from ``start`` to ``end`` over the run."""
    return cosine_schedule(step, max(total_steps, 1), start, end)


class BYOL(nn.Module):
    """Online network, predictor and momentum target; ``forward(x0, x1)`` is the loss."""

    def __init__(
        self, backbone: DescriptorModel, *, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.dim, proj_hidden, proj_dim)
        self.prediction_head = BYOLPredictionHead(proj_dim, pred_hidden, proj_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(representation(self.backbone, x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(representation(self.backbone_momentum, x)).detach()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.online(x0), self.online(x1)
        z0, z1 = self.target(x0), self.target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
