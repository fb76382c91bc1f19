"""InfoNCE over copies: the other copies of a photo are positives, other photos negatives.

pytorch-metric-learning's SupConLoss (cosine similarity / ``temperature``; per anchor, the
mean ``-log softmax`` of its positives among all other items). With two copies per photo it
equals NTXentLoss; with more it matches the former hand-written multi-positive loss exactly,
where NTXentLoss would leave the other positives out of each softmax.

``queue_size`` > 0 wraps it in CrossBatchMemory (XBM, Wang et al. 2020): a FIFO memory of
detached past embeddings that the batch is compared with. Unlike the former MoCo-style queue,
the memory holds the current batch too (so ``queue_size`` must be at least the batch,
photos_per_batch x copies), in-batch pairs pass gradient to the anchor side only, and earlier
copies of the same photo in memory count as positives.
"""

from __future__ import annotations

from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss
from torch import nn


def infonce(num_classes: int, dim: int, *, temperature: float = 0.1, queue_size: int = 0) -> nn.Module:
    """SupCon InfoNCE; ``queue_size`` = 0 uses in-batch negatives only."""
    loss = SupConLoss(temperature=temperature)
    return CrossBatchMemory(loss, dim, memory_size=queue_size) if queue_size else loss
