"""Triplet loss with in-batch mining: ``relu(d(a, p) - d(a, n) + margin)`` per anchor.

The positive is the anchor's hardest positive; the negative is picked by ``mining``:
``"hard"`` (closest negative) or ``"semihard"`` (see :mod:`pretrain.losses.mining`).
Batches must hold at least two copies per photo (P photos x K copies).

Example::

    loss_fn = TripletLoss(margin=0.2, mining="semihard")
    emb = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    loss = loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.losses.mining import MINERS, hardest_positives, pairwise_distances


class TripletLoss(nn.Module):
    """Batch-hard triplet loss over anchors that have a positive and a negative."""

    def __init__(self, margin: float = 0.2, mining: str = "hard") -> None:
        super().__init__()
        if mining not in MINERS:
            raise ValueError(f"unknown triplet mining {mining!r}; choose from {', '.join(MINERS)}")
        self.margin = margin
        self.mining = mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pairwise_distances(embeddings)
        pos = hardest_positives(dist, labels)
        miner = MINERS[self.mining]
        neg = miner(dist, labels, self.margin) if self.mining == "semihard" else miner(dist, labels)
        ok = (pos >= 0) & (neg >= 0)
        if not ok.any():
            raise ValueError("triplet loss: no anchor has both a positive and a negative in the batch")
        rows = ok.nonzero().squeeze(1)
        d_ap, d_an = dist[rows, pos[rows]], dist[rows, neg[rows]]
        return torch.relu(d_ap - d_an + self.margin).mean()
