"""Pooling and normalisation layers that turn trunk features into descriptors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float = 1e-6, grid: int = 1) -> torch.Tensor:
    """Generalised-mean pool a ``B x C x H x W`` map to ``B x C`` (``B x C*grid*grid`` with a grid).

    ``p = 1`` is average pooling and ``p -> inf`` tends to max pooling. The input must be
    non-negative (e.g. after a ReLU): values are clamped to ``eps`` so that the fractional
    power stays real, which would silently zero out negative activations. ``grid > 1`` pools
    each cell of a ``grid x grid`` partition and concatenates them cell by cell (regional
    pooling: a copy keeps its layout, so where a pattern is tells copies apart).
    """
    if x.ndim != 4:
        raise ValueError(f"GeM expects a B x C x H x W feature map, got shape {tuple(x.shape)}")
    cells = F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), grid)  # B x C x grid x grid
    return cells.flatten(2).transpose(1, 2).flatten(1).pow(1.0 / p)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.) with a learnable or fixed exponent ``p``.

    Input must be non-negative, see :func:`gem`. A learnable ``p`` is a parameter (saved in the
    state dict); a fixed one is a buffer, so both round-trip through checkpoints. ``grid``
    pools regions (see :func:`gem`) with the same ``p``, so a trained GeM reads out either way.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True, grid: int = 1) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"GeM grid must be >= 1, got {grid}")
        self.grid = grid
        p_tensor = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps, self.grid)

    def out_features(self, channels: int) -> int:
        return channels * self.grid * self.grid

    def extra_repr(self) -> str:
        learnable = isinstance(self.p, nn.Parameter)
        return f"p={self.p.item():.3f}, eps={self.eps}, learnable={learnable}, grid={self.grid}"


class TokenPool(nn.Module):
    """Pool a ViT token sequence ``B x N x C`` to ``B x C``.

    ``mode="cls"`` takes the first (class) token; ``mode="mean"`` averages the patch tokens,
    skipping the ``num_prefix_tokens`` class/register tokens at the front.
    """

    def __init__(self, mode: str, num_prefix_tokens: int) -> None:
        super().__init__()
        if mode not in ("cls", "mean"):
            raise ValueError(f"TokenPool mode must be 'cls' or 'mean', got {mode!r}")
        if mode == "cls" and num_prefix_tokens < 1:
            raise ValueError("TokenPool mode 'cls' needs a model with a class token")
        self.mode = mode
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"TokenPool expects B x N x C tokens, got shape {tuple(x.shape)}")
        if self.mode == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(dim=1)

    def out_features(self, channels: int) -> int:
        return channels

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_prefix_tokens={self.num_prefix_tokens}"

