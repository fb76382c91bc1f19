"""ArcFace (Deng et al. 2019): additive angular margin, true-class logit ``cos(theta + m)``.

Example::

    loss_fn = ArcFaceLoss(num_classes=10, dim=64)
    emb = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    loss = loss_fn(emb, torch.randint(0, 10, (8,)))
"""

from __future__ import annotations

import math

import torch

from pretrain.losses.margin import MarginSoftmax


class ArcFaceLoss(MarginSoftmax):
    """Instance softmax with the angle of the true class increased by ``margin`` radians."""

    def margin_cos(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin
        sin = (1.0 - cos.pow(2)).clamp_min(1e-7).sqrt()
        shifted = cos * math.cos(m) - sin * math.sin(m)
        # Past theta = pi - m, cos(theta + m) is no longer decreasing: use the CosFace-like
        # linear continuation so the logit keeps falling as the angle grows.
        return torch.where(cos > math.cos(math.pi - m), shifted, cos - math.sin(math.pi - m) * m)
