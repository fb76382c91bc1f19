"""Members on one scale before fusion, measured against the normalisation background.

A normalised score is ``similarity - best background similarity``: how far a reference stands
above the best of the train/ photos, which are known non-copies. How far is "far" differs by
member: a member whose similarities to unrelated photos are spread wide (a low resolution, a
weaker model) gives non-copies large margins too, and under a max over members it floods the
top of the ranking. The spread is visible in the background itself: the top ``n`` train
similarities of a query view are a sample of the upper tail of its non-copy scores, and the
mean excess of the top ``n - 1`` over the ``n``-th estimates that tail's scale (the scale of an
exponential / Gumbel tail). :func:`tail_scale` takes the median over a member's query views;
:func:`member_factors` turns the scales into multipliers whose geometric mean is 1, so scores
keep their units (a verification bonus still means what it meant) and one member alone is
unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from core.knn import knn

TAIL_NEIGHBOURS = 10  # background similarities per view that estimate its tail scale


def tail_scale(similarities: np.ndarray) -> float:
    """Median over rows of ``mean(s_1..s_{n-1}) - s_n`` for rows of the top ``n`` background
    similarities, best first (``n >= 2``)."""
    s = np.asarray(similarities, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2 or not len(s):
        raise ValueError(f"tail_scale: need rows of >= 2 background similarities, got shape {s.shape}")
    return float(np.median(s[:, :-1].mean(axis=1) - s[:, -1]))


def background_scale(queries: np.ndarray, train: np.ndarray, n: int = TAIL_NEIGHBOURS) -> float:
    """:func:`tail_scale` of query descriptors against train descriptors (top ``n`` each)."""
    if len(train) < 2:
        raise ValueError(f"background_scale: need >= 2 train descriptors, got {len(train)}")
    scores, _ = knn(queries, train, min(n, len(train)))
    return tail_scale(scores)


def member_factors(scales: Mapping[str, float]) -> dict[str, float]:
    """``{member: gmean(scales) / scale}``: multipliers that put every member on one scale."""
    bad = {k: v for k, v in scales.items() if not v > 0}
    if bad:
        raise ValueError(f"member_factors: tail scales must be > 0, got {bad}")
    if not scales:
        return {}
    g = float(np.exp(np.mean(np.log(list(scales.values())))))
    return {k: g / v for k, v in scales.items()}
