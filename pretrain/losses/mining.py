"""Triplet mining inside a batch (batch-hard, Hermans et al. 2017; semi-hard, FaceNet).

Functions take a ``B x B`` distance matrix and ``B`` labels and return, per anchor, the index
of the chosen positive or negative (-1 where the anchor has none).

Example::

    dist = pairwise_distances(embeddings)
    pos, neg = hardest_positives(dist, labels), hardest_negatives(dist, labels)
"""

from __future__ import annotations

import torch


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows (``B x B``, zero diagonal).

    Written out (not ``cdist``) so that the zero diagonal has a zero, not NaN, gradient.
    """
    x = embeddings.float()
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(1e-12)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _pick(values: torch.Tensor, valid: torch.Tensor, largest: bool) -> torch.Tensor:
    fill = float("-inf") if largest else float("inf")
    masked = values.masked_fill(~valid, fill)
    idx = masked.argmax(1) if largest else masked.argmin(1)
    return torch.where(valid.any(1), idx, torch.full_like(idx, -1))


def hardest_positives(dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The farthest other item of the anchor's class."""
    pos, _ = _masks(labels)
    return _pick(dist, pos, largest=True)


def hardest_negatives(dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The closest item of another class."""
    _, neg = _masks(labels)
    return _pick(dist, neg, largest=False)


def semi_hard_negatives(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """The closest negative that is farther than the anchor's hardest positive but inside the
    margin (``d_ap < d_an < d_ap + margin``); where there is none, the hardest negative."""
    pos_idx = hardest_positives(dist, labels)
    d_ap = dist.gather(1, pos_idx.clamp_min(0)[:, None])
    _, neg = _masks(labels)
    semi = neg & (dist > d_ap) & (dist < d_ap + margin)
    chosen = _pick(dist, semi, largest=False)
    return torch.where(chosen >= 0, chosen, hardest_negatives(dist, labels))


MINERS = {"hard": hardest_negatives, "semihard": semi_hard_negatives}
