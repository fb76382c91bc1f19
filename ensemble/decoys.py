"""The is-copy threshold from the run's own queries: a target-decoy estimate of precision.

The train/ photos are non-copies of every query (ISC21 keeps them apart from the references).
Searched like references, with the same query views and score normalisation, they show what
scores non-copies reach *for these queries*: the decoys. Their number above a score ``t``,
times ``references / train``, estimates the false pairs among the predictions above ``t``; the
predictions themselves are counted without ground truth. So the estimated precision at ``t`` is
``1 - (decoys(t) + 1) * ratio / predictions(t)``, and the threshold is the lowest score from which
the estimate stays at or above the target (the target-decoy method of proteomics, here with
image pairs). Unlike a threshold read off synthetic copies, it follows the query set's own
share of copies and its own edits. The ``+ 1`` is the finite-sample correction of knockoff+
(Barber & Candes, 2015): few decoys above a score are a noisy count, often 0 where non-copies
are, and a small query set would otherwise get a threshold its noise chose.

A decoy must not be normalised against itself: train photos are split into folds by a hash of
their id, and a decoy's bias comes from the other folds only (cross-fitting). Folds rather
than leave-one-out, because photo collections hold near-duplicates (bursts of one scene):
under leave-one-out two burst shots in train/ cancel each other, which two shots among the
references never do. The other folds are a smaller background than a reference's, and a
non-copy beats the best of ``n`` exchangeable background photos with probability
``1 / (n + 1)``: decoys cross a score ``folds / (folds - 1)`` times as often as false
references do, so each counts for :func:`fold_factor` of one (measured on minidisc with 5
folds: 1.2-1.3 times as many decoys as non-copy predictions above scores 0 to 0.04).
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.knn import Hits


def fold_of(image_ids: Sequence[str] | np.ndarray, folds: int) -> np.ndarray:
    """A fold in ``[0, folds)`` per image id, stable across shards, runs and machines."""
    return np.array([zlib.crc32(str(i).encode()) % folds for i in np.ravel(image_ids)], np.int64).reshape(
        np.shape(image_ids))


def decoy_hits(train: Hits, folds: int, neighbours: int, beta: float, k: int) -> Hits:
    """Each query row's top-``k`` decoys from its top train hits (scores best first).

    A decoy in fold ``f`` scores ``similarity - beta * mean(best neighbours outside f)``, as a
    reference scores against the whole background; rows padded with ``-inf`` scores stay padded.
    """
    scores, image_ids, patch_ids = train
    scores = np.asarray(scores, np.float64)
    fold = fold_of(image_ids, folds)
    valid = np.isfinite(scores)
    out = np.full(scores.shape, -np.inf)
    # no background hit outside a fold among the top hits: the lowest hit bounds it from above
    lowest = np.where(valid, scores, np.inf).min(axis=1)
    for f in range(folds):
        other = valid & (fold != f)
        take = other & (np.cumsum(other, axis=1) <= neighbours)
        n = take.sum(axis=1)
        bias = np.where(n > 0, np.where(take, scores, 0.0).sum(axis=1) / np.maximum(n, 1), lowest)
        mine = valid & (fold == f)
        out = np.where(mine, scores - beta * bias[:, None], out)
    order = np.argsort(-out, axis=1, kind="stable")[:, :k]
    best = [np.take_along_axis(np.asarray(a), order, axis=1) for a in (out, image_ids, patch_ids)]
    return best[0].astype(np.float32), best[1], best[2]


def fold_factor(folds: int) -> float:
    """``(folds - 1) / folds``: the false references one decoy stands for, per reference / train
    photo (a decoy is normalised against ``(folds - 1) / folds`` of the background)."""
    if folds < 2:
        raise ValueError(f"decoy folds must be >= 2, got {folds}")
    return (folds - 1) / folds


@dataclass(frozen=True)
class Estimate:
    """The threshold and what the decoys say about the predictions at and above it."""

    threshold: float | None  # None: no score reaches the target precision
    target: float
    precision: float | None  # estimated (one decoy more than found), at ``threshold``
    pairs: int  # predictions at or above ``threshold``
    decoys: int  # decoy pairs at or above ``threshold`` (before scaling by ``ratio``)
    ratio: float  # false references per decoy: references / train images x fold_factor


def q_values(predictions: np.ndarray, decoys: np.ndarray, ratio: float) -> np.ndarray:
    """Each prediction's q-value (in the order given): the estimated false share of the list of
    predictions cut at its score, the lowest over the cuts that keep it; ``1 - q`` is the precision
    of acting on every pair that scores at least as high."""
    scores = np.asarray(predictions, np.float64)
    order = np.argsort(-scores, kind="stable")
    fake = np.sort(np.asarray(decoys, np.float64))[::-1]
    above = np.searchsorted(-fake, -scores[order], side="right")  # decoys >= each prediction's score
    fdr = (above + 1) * ratio / np.arange(1, len(scores) + 1)
    q = np.empty(len(scores))
    q[order] = np.minimum(np.minimum.accumulate(fdr[::-1])[::-1], 1.0)
    return q


def q_curve(predictions: np.ndarray, q: np.ndarray, decimals: int = 3) -> list[tuple[float, float]]:
    """The predictions' score -> q-value step function, small enough to keep with an index:
    ``(lowest score, q)`` per q level, best first, q rounded up to ``decimals`` (conservative)."""
    order = np.argsort(-np.asarray(predictions, np.float64), kind="stable")
    scores, levels = np.asarray(predictions, np.float64)[order], np.ceil(np.asarray(q)[order] * 10**decimals - 1e-9)
    last = np.r_[levels[1:] != levels[:-1], True]  # each level's lowest score
    return list(zip(scores[last].tolist(), (levels[last] / 10**decimals).tolist()))


def q_at(curve: Sequence[tuple[float, float]], score: float) -> float:
    """A new score's q-value on a :func:`q_curve`: that of the best prediction scoring at most as
    high (conservative between predictions); the deepest q below the curve's lowest score."""
    bottoms = -np.array([s for s, _ in curve])
    return curve[min(int(np.searchsorted(bottoms, -score, side="left")), len(curve) - 1)][1]


def estimate_threshold(predictions: np.ndarray, decoys: np.ndarray, ratio: float, target: float,
                       q: np.ndarray | None = None) -> Estimate:
    """The lowest prediction score from which the estimated precision stays >= ``target``; ``q``:
    the predictions' :func:`q_values`, when the caller has them already."""
    if not 0 < target < 1:
        raise ValueError(f"target precision must be in (0, 1), got {target}")
    if not ratio > 0:
        raise ValueError(f"references / train ratio must be > 0, got {ratio}")
    real, fake = np.asarray(predictions, np.float64), np.asarray(decoys, np.float64)
    ok = (q_values(real, fake, ratio) if q is None else q) <= 1 - target + 1e-12  # 1 - 0.9 is 0.0999...
    if not ok.any():
        return Estimate(None, target, None, 0, 0, ratio)
    t = real[ok].min()  # q rises down the list: the kept pairs are the best ones
    pairs, found = int(np.count_nonzero(real >= t)), int(np.count_nonzero(fake >= t))  # ties with t are kept too
    return Estimate(float(t), target, float(1 - (found + 1) * ratio / pairs), pairs, found, ratio)
