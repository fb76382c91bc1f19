"""Fusion parameters picked on a validation split with known ground truth.

Everything here scores candidate settings with the real pipeline functions (normalisation,
:func:`ensemble.fuse.fuse_models`, :func:`ensemble.fuse.top_k_per_query`,
:func:`ensemble.metrics.evaluate`), so a tuned setting is exactly what the run will do.
Ties keep the earlier setting: the untuned start for thresholds, the smaller beta for beta.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ensemble.fuse import fuse_models, max_over_patches, top_k_per_query
from ensemble.metrics import evaluate
from ensemble.normalize import normalize_scores

GT = Sequence[tuple[str, str]]
DEFAULT_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def predictions_map(pred: pa.Table, gt: GT, k: int = 10) -> float:
    """μAP of image-level ``(query_id, reference_id, score)`` predictions after top-``k`` per query."""
    pred = top_k_per_query(pred, k)
    return evaluate(gt, pred.column("query_id").to_numpy(zero_copy_only=False),
                    pred.column("reference_id").to_numpy(zero_copy_only=False),
                    pred.column("score").to_numpy()).micro_ap


def fused_map(per_model: pa.Table, gt: GT, thresholds: Mapping[str, float], rule: str, k: int = 10) -> float:
    """μAP of the fused predictions for one setting of the thresholds."""
    return predictions_map(fuse_models(per_model, thresholds, rule), gt, k)


def quantile_grid(per_model: pa.Table, levels: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, list[float]]:
    """Per model, the distinct quantiles of its scores at ``levels`` (candidate thresholds)."""
    out = {}
    for model in sorted(set(per_model.column("model").to_pylist())):
        s = per_model.filter(pc.equal(per_model.column("model"), model)).column("score").to_numpy()
        out[model] = sorted({float(v) for v in np.quantile(s.astype(np.float64), levels, method="lower")})
    return out


def tune_thresholds(per_model: pa.Table, gt: GT, rule: str,
                    grid: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_QUANTILES,
                    k: int = 10, max_rounds: int = 5) -> dict[str, float]:
    """Per-model thresholds maximising μAP under ``rule``, by coordinate ascent.

    ``per_model`` has columns query_id, reference_id, model, score (image level, e.g. from
    :func:`max_over_patches`). ``grid`` is either quantile levels, turned into thresholds per
    model from its own scores, or explicit candidate thresholds per model. Starting from each
    model's lowest candidate, one model at a time moves to its best candidate with the others
    fixed; rounds repeat until nothing improves (or ``max_rounds``).
    """
    if per_model.num_rows == 0:
        raise ValueError("tune_thresholds: no scores to tune on")
    cands = {m: sorted(float(t) for t in v) for m, v in grid.items()} if isinstance(grid, Mapping) \
        else quantile_grid(per_model, grid)
    empty = [m for m, v in cands.items() if not v]
    if empty:
        raise ValueError(f"tune_thresholds: no candidate thresholds for {empty}")
    best = {m: v[0] for m, v in cands.items()}
    best_map = fused_map(per_model, gt, best, rule, k)
    for _ in range(max_rounds):
        improved = False
        for model, values in cands.items():
            for t in values:
                trial = {**best, model: t}
                score = fused_map(per_model, gt, trial, rule, k)
                if score > best_map:
                    best, best_map, improved = trial, score, True
        if not improved:
            break
    return best


def tune_beta(candidates: pa.Table, bias: pa.Table, gt: GT, grid: Sequence[float],
              k: int = 10) -> tuple[float, float]:
    """``(beta, μAP)``: the normalisation beta of ``grid`` whose predictions score best.

    ``candidates`` are one member's patch-level candidates, ``bias`` its query patches'
    neighbour similarities (:func:`ensemble.normalize.bias_table`); each beta is scored as
    normalise -> max over patches -> top k per query.
    """
    if not grid:
        raise ValueError("tune_beta: empty beta grid")
    results = []
    for beta in grid:
        pairs = max_over_patches(normalize_scores(candidates, bias, beta).drop_columns(
            [c for c in ("model",) if c in candidates.column_names]))
        results.append((predictions_map(pairs, gt, k), -float(beta)))
    best_map, neg_beta = max(results)
    return -neg_beta, best_map
