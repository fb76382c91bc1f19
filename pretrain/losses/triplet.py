"""Triplet loss on in-batch triplets: ``relu(d(a, p) - d(a, n) + margin)``, mean over anchors.

pytorch-metric-learning's TripletMarginLoss (Euclidean distance between L2-normalised
embeddings) fed by one triplet per anchor from a miner named by ``mining``:

- ``"hard"``: BatchHardMiner, the farthest positive and the closest negative (Hermans et al. 2017).
- ``"semihard"``: BatchEasyHardMiner(pos="hard", neg="semihard"), the farthest positive and the
  closest negative farther than it (FaceNet). An anchor with no such negative drops out (the
  former hand-written miner fell back to its hardest negative instead).

Batches must hold at least two copies per photo (P photos x K copies); a batch without
any triplet gives a zero loss.
"""

from __future__ import annotations

from collections.abc import Callable

from pytorch_metric_learning.losses import MultipleLosses, TripletMarginLoss
from pytorch_metric_learning.miners import BaseMiner, BatchEasyHardMiner, BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer
from torch import nn

MINERS: dict[str, Callable[[], BaseMiner]] = {
    "hard": BatchHardMiner,
    "semihard": lambda: BatchEasyHardMiner(pos_strategy=BatchEasyHardMiner.HARD,
                                           neg_strategy=BatchEasyHardMiner.SEMIHARD),
}


def triplet(num_classes: int, dim: int, *, margin: float = 0.2, mining: str = "hard") -> nn.Module:
    """Triplet loss over the ``mining`` triplets; the mean includes zero-loss triplets."""
    if mining not in MINERS:
        raise ValueError(f"unknown triplet mining {mining!r}; choose from {', '.join(MINERS)}")
    # MeanReducer, not PML's default AvgNonZeroReducer: every mined anchor counts, as before
    loss = TripletMarginLoss(margin=margin, reducer=MeanReducer())
    return MultipleLosses([loss], miners=[MINERS[mining]()])
