"""Run a loss in float32 outside autocast.

PML losses cast their own state to the embeddings' dtype on every call (``W`` of ArcFace and
CosFace, the memory of CrossBatchMemory): under the bf16 autocast of GPU fine-tuning that
would turn the float32 class weights into a bf16 parameter for good.
"""

from __future__ import annotations

import torch
from torch import nn


class FullPrecision(nn.Module):
    """``loss(embeddings.float(), labels)`` with autocast off."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.loss(embeddings.float(), labels)
