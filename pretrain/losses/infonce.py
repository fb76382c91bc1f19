"""InfoNCE / contrastive loss with in-batch negatives and an optional memory bank (queue).

For each anchor, the other copies of its photo in the batch are positives; every other photo
in the batch, and every entry of a FIFO queue of past embeddings (MoCo-style memory bank) from
other photos, is a negative. The loss averages ``-log softmax`` over each anchor's positives.

Example::

    loss_fn = InfoNCELoss(dim=64, temperature=0.1, queue_size=256)
    emb = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    loss = loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))   # then enqueues emb
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """Multi-positive InfoNCE; ``queue_size`` = 0 uses in-batch negatives only."""

    def __init__(self, dim: int, *, temperature: float = 0.1, queue_size: int = 0) -> None:
        super().__init__()
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_size, dim))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(embeddings.float(), dim=1)
        n = len(emb)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        logits = emb @ emb.T / self.temperature
        valid = ~eye  # which columns take part in the softmax
        if len(self.queue):
            bank = self.queue_labels >= 0
            # clone: the enqueue below writes the buffer that backward still needs
            logits = torch.cat([logits, emb @ self.queue.clone().T / self.temperature], 1)
            # the queue only contributes negatives: entries of the anchor's own photo are skipped
            valid = torch.cat([valid, bank[None, :] & (labels[:, None] != self.queue_labels[None, :])], 1)
            same = torch.cat([same, torch.zeros(n, len(self.queue), dtype=torch.bool, device=emb.device)], 1)
        positive = same & valid
        has_pos = positive.any(1)
        if not has_pos.any():
            raise ValueError("InfoNCE: no anchor has a positive (need >= 2 copies of a photo per batch)")
        log_prob = logits.masked_fill(~valid, float("-inf")).log_softmax(1)
        per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp_min(1))
        loss = per_anchor[has_pos].mean()
        if self.training and len(self.queue):
            self._enqueue(emb.detach(), labels)
        return loss

    @torch.no_grad()
    def _enqueue(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        size = len(self.queue)
        emb, labels = emb[-size:], labels[-size:]
        idx = (self.queue_ptr + torch.arange(len(emb), device=emb.device)) % size
        self.queue[idx] = emb.to(self.queue.dtype)
        self.queue_labels[idx] = labels
        self.queue_ptr.fill_(int((self.queue_ptr + len(emb)) % size))
