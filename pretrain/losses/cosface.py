"""CosFace (Wang et al. 2018): additive cosine margin, true-class logit ``cos(theta) - m``.

Example::

    loss_fn = CosFaceLoss(num_classes=10, dim=64, margin=0.35)
    emb = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    loss = loss_fn(emb, torch.randint(0, 10, (8,)))
"""

from __future__ import annotations

import torch

from pretrain.losses.margin import MarginSoftmax


class CosFaceLoss(MarginSoftmax):
    """Instance softmax with ``margin`` subtracted from the true-class cosine."""

    def margin_cos(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.margin
