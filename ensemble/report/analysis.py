"""The numbers behind the run report: per-member and ensemble metrics, per-family recall, error lists."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.metrics import Metrics, evaluate
from ensemble.fuse import max_over_patches, top_k_per_query

log = logging.getLogger(__name__)

GT = Sequence[tuple[str, str]]
ENSEMBLE = "ensemble"


def member_pairs(candidates: pa.Table) -> pa.Table:
    """Image-level ``(query_id, reference_id, score)`` of one member: max over patch pairs."""
    return max_over_patches(candidates.drop_columns([c for c in ("model",) if c in candidates.column_names]))


def score(pred: pa.Table, gt: GT) -> Metrics:
    """ISC21 metrics of a ``(query_id, reference_id, score)`` table."""
    return evaluate(gt, _ids(pred, "query_id"), _ids(pred, "reference_id"), pred.column("score").to_numpy())


@dataclass
class Scored:
    """One row of the report: a member (or the ensemble), its predictions and metrics."""

    name: str
    predictions: pa.Table  # top k per query, as evaluated
    pairs: pa.Table  # every image-level pair score (for the gallery)
    metrics: Metrics


def score_members(members: Mapping[str, pa.Table], ensemble: pa.Table | None, gt: GT, k: int) -> list[Scored]:
    """Members (patch candidates -> max over patches -> top k) and the ensemble's predictions, scored."""
    out = []
    for name, cands in members.items():
        pairs = member_pairs(cands)
        pred = top_k_per_query(pairs, k)
        out.append(Scored(name, pred, pairs, score(pred, gt)))
    if ensemble is not None:
        out.append(Scored(ENSEMBLE, ensemble, ensemble, score(ensemble, gt)))
    return out


def family_recall(scored: Sequence[Scored], gt: GT,
                  families: Mapping[str, Sequence[str]]) -> dict[str, dict[str, tuple[float, int]]]:
    """``{family: {name: (R@1, #GT pairs)}}`` over the queries edited with each transform family."""
    by_family: dict[str, set[str]] = {}
    for q, fams in families.items():
        for f in fams:
            by_family.setdefault(f, set()).add(q)
    out = {}
    for fam in sorted(by_family):
        queries = by_family[fam]
        sub_gt = [g for g in gt if g[0] in queries]
        if not sub_gt:
            continue
        value_set = pa.array(sorted(queries), pa.string())
        out[fam] = {}
        for s in scored:
            pred = s.predictions.filter(pc.is_in(s.predictions.column("query_id"), value_set=value_set))
            out[fam][s.name] = (score(pred, sub_gt).recall_at_1, len(sub_gt))
    if families and not out:
        log.warning("the query metadata names none of the ground truth's queries: no recall per family")
    return out


def positive_mask(pred: pa.Table, gt: GT) -> np.ndarray:
    """Which rows of ``pred`` are ground-truth pairs."""
    truth = set(gt)
    return np.array([p in truth for p in zip(_ids(pred, "query_id"), _ids(pred, "reference_id"))], dtype=bool)


def q_calibration(copies: pa.Table, gt: GT,
                  cuts: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)) -> list[tuple[float, int, float]]:
    """``(cut, pairs with q_value <= cut, their true precision)`` for each cut below the deepest
    q_value listed, then that one (past it the list is not complete)."""
    q = copies.column("q_value").to_numpy()
    if not len(q):
        return []
    truth = positive_mask(copies, gt)
    return [(c, int(kept.sum()), float(truth[kept].mean()))
            for c in [*(c for c in cuts if c < q.max()), float(q.max())] if (kept := q <= c).any()]


def false_positives(pred: pa.Table, gt: GT, n: int) -> list[tuple[str, str, float]]:
    """The ``n`` highest-scoring predictions that are not copies."""
    neg = pred.filter(pa.array(~positive_mask(pred, gt)))
    neg = neg.take(pc.sort_indices(neg, [("score", "descending")])).slice(0, n)
    return list(zip(_ids(neg, "query_id"), _ids(neg, "reference_id"), neg.column("score").to_pylist()))


def missed_copies(pred: pa.Table, gt: GT, threshold: float | None) -> list[tuple[str, str, float | None]]:
    """The GT pairs not predicted (score None) or scored below ``threshold``, worst first."""
    scores = dict(zip(zip(_ids(pred, "query_id"), _ids(pred, "reference_id")), pred.column("score").to_pylist()))
    missed = [(q, r, scores.get((q, r))) for q, r in gt]
    missed = [m for m in missed if m[2] is None or (threshold is not None and m[2] < threshold)]
    missed.sort(key=lambda m: -np.inf if m[2] is None else m[2])
    return missed


def pair_scores(scored: Sequence[Scored],
                pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, float]]:
    """For each wanted pair, ``{name: score}`` of every member/ensemble that scored it."""
    out: dict[tuple[str, str], dict[str, float]] = {p: {} for p in pairs}
    for s in scored:
        keys = zip(_ids(s.pairs, "query_id"), _ids(s.pairs, "reference_id"))
        for pair, v in zip(keys, s.pairs.column("score").to_pylist()):
            if pair in out:
                out[pair][s.name] = v
    return out


def _ids(table: pa.Table, column: str) -> list[str]:
    return table.column(column).to_pylist()
