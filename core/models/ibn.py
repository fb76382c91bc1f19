"""ResNet-50-IBN-a (Pan et al., ECCV 2018) built from timm's ResNet-50.

timm has no IBN-Net, so we swap the first BatchNorm of every bottleneck in layer1-3 for an
:class:`IBN` block. Instance normalisation on half the channels removes per-image contrast and
colour statistics, which helps copy detection under colour/contrast edits. The submodule names
``IN`` / ``BN`` follow the published IBN-Net checkpoints so their state dicts load as-is.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

IBN_LAYERS = ("layer1", "layer2", "layer3")  # IBN-a leaves layer4 pure BatchNorm


class IBN(nn.Module):
    """InstanceNorm (affine) on the first ``ratio`` of the channels, BatchNorm on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


def resnet50_ibn_a(**timm_kwargs: Any) -> nn.Module:
    """A timm ``resnet50`` (random init) with IBN-a blocks; kwargs go to ``timm.create_model``."""
    model = timm.create_model("resnet50", pretrained=False, **timm_kwargs)
    for layer_name in IBN_LAYERS:
        for block in getattr(model, layer_name):
            block.bn1 = IBN(block.bn1.num_features)
    return model
