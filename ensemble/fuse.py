"""From patch-level candidates to image-level predictions (the D2LV max-ensembling rules).

1. :func:`max_over_patches`: image-pair score = max over all (query patch, reference patch)
   pairs, per model.
2. :func:`calibrate`: each model's scores times its factor, so members share one scale
   (factors from :func:`ensemble.calibrate.member_factors`).
3. :func:`fuse`: one score per image pair from several models: the max, filtered by a rule from
   :data:`RULES` given per-model thresholds α_i, or the ``mean`` over models (:func:`mean_over_models`).
4. :func:`top_k_per_query`: at most k predictions per query, best first.
5. :func:`demote_others`: on the final scores, a query's candidates below its best are lowered
   (a query copies at most one reference).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAIR = ["query_id", "reference_id"]


def _group_max(table: pa.Table, keys: list[str]) -> pa.Table:
    """Max score per key group, groups in order of first appearance."""
    out = table.group_by(keys, use_threads=False).aggregate([("score", "max")])
    return out.rename_columns([*keys, "score"]).select([*keys, "score"])


def max_over_patches(candidates: pa.Table) -> pa.Table:
    """Image-level ``(query_id, reference_id, score[, model])``: max over all patch pairs.

    With a ``model`` column the max is taken per model, so models can be fused afterwards.
    """
    keys = PAIR + (["model"] if "model" in candidates.column_names else [])
    return _group_max(candidates, keys).select([*PAIR, "score", *keys[2:]])


# A rule maps (number of listed models that clear their threshold, number listed) to a keep mask.
Rule = Callable[[np.ndarray, int], np.ndarray]
RULES: dict[str, Rule] = {
    "max": lambda passed, n_listed: np.ones(len(passed), dtype=bool),
    "confidence": lambda passed, n_listed: passed == n_listed,  # every listed model agrees
    "completeness": lambda passed, n_listed: passed >= 1,  # any listed model is sure
}


def fuse_models(per_model: pa.Table, thresholds: Mapping[str, float], rule: str) -> pa.Table:
    """``(query_id, reference_id, score)`` with score = max over models, filtered by ``rule``.

    ``per_model`` has columns query_id, reference_id, model, score. For ``confidence`` a pair
    is kept only if every model in ``thresholds`` scores it >= its threshold (a model with no
    score for the pair fails); for ``completeness`` one such model is enough. Models absent
    from ``thresholds`` still contribute to the max but never to the test.
    """
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; known rules: {sorted(RULES)}")
    if rule != "max" and not thresholds:
        raise ValueError(f"fusion rule {rule!r} needs a threshold for at least one model")
    models = per_model.column("model")
    listed = pa.array(list(thresholds), pa.string())
    # thresholds in the score's own precision: float32 0.7 must clear a configured 0.7
    values = pa.array(list(thresholds.values()), per_model.schema.field("score").type)
    thr = pc.take(values, pc.index_in(models, value_set=listed))
    cleared = pc.fill_null(pc.greater_equal(per_model.column("score"), thr), False)
    marked = per_model.select([*PAIR, "score"]).append_column(
        "cleared", pc.if_else(cleared, models, pa.scalar(None, pa.string())))
    grouped = marked.group_by(PAIR, use_threads=False).aggregate(
        [("score", "max"), ("cleared", "count_distinct")])  # nulls (not cleared) are not counted
    keep = RULES[rule](grouped.column("cleared_count_distinct").to_numpy(), len(thresholds))
    out = grouped.filter(pa.array(keep))
    return pa.table({"query_id": out.column("query_id"), "reference_id": out.column("reference_id"),
                     "score": out.column("score_max")})


def calibrate(per_model: pa.Table, factors: Mapping[str, float]) -> pa.Table:
    """``per_model`` with each model's scores multiplied by its factor (unlisted models: 1)."""
    if not factors:
        return per_model
    listed = pa.array(list(factors), pa.string())
    at = pc.index_in(per_model.column("model"), value_set=listed)
    factor = pc.fill_null(pc.take(pa.array(list(factors.values()), pa.float64()), at), 1.0)
    score = pc.multiply(pc.cast(per_model.column("score"), pa.float64()), factor)
    i = per_model.schema.get_field_index("score")
    return per_model.set_column(i, per_model.schema.field(i), pc.cast(score, per_model.schema.field(i).type))


def mean_over_models(per_model: pa.Table) -> pa.Table:
    """``(query_id, reference_id, score)``: the mean over models of every pair any model found.

    A model that did not return a pair for a query (it was not in its top k) counts with its
    lowest score for that query, an upper bound of the score it would give; a model with no
    pair at all for the query counts with its lowest score overall.
    """
    df = per_model.select([*PAIR, "model", "score"]).to_pandas()
    df["score"] = df["score"].astype(np.float64)
    wide = df.pivot_table(index=PAIR, columns="model", values="score", aggfunc="max")
    floor = df.groupby(["query_id", "model"])["score"].min().unstack("model").reindex(columns=wide.columns)
    floor = floor.fillna(df.groupby("model")["score"].min())
    filled = wide.fillna(floor.reindex(wide.index.get_level_values("query_id")).set_axis(wide.index))
    return pa.table({"query_id": pa.array(filled.index.get_level_values("query_id"), pa.string()),
                     "reference_id": pa.array(filled.index.get_level_values("reference_id"), pa.string()),
                     "score": pa.array(filled.mean(axis=1).to_numpy(), per_model.schema.field("score").type)})


def fuse(per_model: pa.Table, thresholds: Mapping[str, float], rule: str,
         factors: Mapping[str, float] | None = None) -> pa.Table:
    """Calibrate by ``factors``, then :func:`fuse_models` (``rule: mean``: :func:`mean_over_models`);
    one model without thresholds passes through unchanged."""
    per_model = calibrate(per_model, factors or {})
    if not thresholds and pc.count_distinct(per_model.column("model")).as_py() <= 1:
        return per_model.select([*PAIR, "score"])
    if rule == "mean":
        return mean_over_models(per_model)
    return fuse_models(per_model, thresholds, rule)


def top_k_per_query(pred: pa.Table, k: int) -> pa.Table:
    """At most ``k`` rows per query, queries sorted by id, scores descending (ties keep input order)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pred = pred.take(pc.sort_indices(pred, [("query_id", "ascending"), ("score", "descending")]))
    if pred.num_rows == 0:
        return pred
    q = pred.column("query_id")
    new = np.r_[True, pc.not_equal(q.slice(1), q.slice(0, len(q) - 1)).to_numpy(zero_copy_only=False)]
    rank = np.arange(len(new)) - np.flatnonzero(new)[np.cumsum(new) - 1]
    return pred.filter(pa.array(rank < k))


def demote_others(pred: pa.Table, share: float, rivals: pa.Table | None = None) -> pa.Table:
    """Each query's candidates scoring below its best lose ``share`` times the best's score (when
    positive). A query copies at most one reference (ISC21), so a strong best match makes the
    query's other candidates less likely copies than equal scores of other queries. The order
    within a query and every best score are unchanged; rows keep their order.

    ``rivals``: more rows of the same queries whose scores count toward each query's best but are
    not returned. Train decoys take the query's predictions as rivals: a decoy stands for a
    non-copy reference in the query's list, lowered below a better prediction as one would be."""
    if share == 0 or pred.num_rows == 0:
        return pred
    queries = [pred.column("query_id")] + ([] if rivals is None else [rivals.column("query_id")])
    group = pc.dictionary_encode(pa.chunked_array([c for q in queries for c in q.chunks], pa.string()))
    group = group.combine_chunks().indices.to_numpy()
    score = np.concatenate([t.column("score").to_numpy().astype(np.float64)
                            for t in [pred] + ([] if rivals is None else [rivals])])
    best = np.full(group.max() + 1, -np.inf)
    np.maximum.at(best, group, score)
    score, top = score[:pred.num_rows], best[group[:pred.num_rows]]
    lowered = np.where(score < top, score - share * np.maximum(top, 0.0), score)
    return pred.set_column(pred.schema.get_field_index("score"), "score",
                           pa.array(lowered, pa.float64()).cast(pred.schema.field("score").type))
