"""Threshold and beta tuning on synthetic validation scores whose best setting is known."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.contracts import CANDIDATES_SCHEMA
from ensemble.fuse import fuse_models
from ensemble.normalize import normalize_scores
from core.metrics import evaluate_table
from ensemble.fuse import demote_others, top_k_per_query
from ensemble.tune import Ranking, fused_map, predictions_map, quantile_grid, tune_beta, tune_thresholds


def two_model_case(seed: int = 0):
    """Model A separates copies (0.6-0.8) from non-copies (0.1-0.5); model B is fooled by
    distractor pairs (0.9-1.0 > every copy) that A scores low. Under the confidence rule
    any A threshold in (max non-copy A score, min copy A score] removes them: μAP 1.0."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(20):
        rows += [(f"q{q}", f"r{q}", "A", rng.uniform(0.6, 0.8)), (f"q{q}", f"r{q}", "B", rng.uniform(0.5, 0.7))]
        for j in range(3):  # distractors of this query
            ref = f"n{q}_{j}"
            rows += [(f"q{q}", ref, "A", rng.uniform(0.1, 0.5)), (f"q{q}", ref, "B", rng.uniform(0.9, 1.0))]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(["query_id", "reference_id", "model"])})
    table = table.append_column("score", pa.array([r[3] for r in rows], pa.float32()))
    gt = [(f"q{q}", f"r{q}") for q in range(20)]
    return table, gt


def test_tune_thresholds_finds_the_separating_threshold():
    per_model, gt = two_model_case()
    a = per_model.filter(pc.equal(per_model.column("model"), "A"))
    pos = np.array([s for q, r, s in zip(*(a.column(c).to_pylist() for c in ("query_id", "reference_id", "score")))
                    if (q, r) in set(gt)])
    neg_max = max(s for s in a.column("score").to_pylist() if s not in pos)
    levels = np.arange(0, 1, 0.01)  # A has 80 scores: level 0.76 picks the lowest copy score
    thr = tune_thresholds(per_model, gt, "confidence", levels)
    assert set(thr) == {"A", "B"}
    assert neg_max < thr["A"] <= pos.min()
    assert fused_map(per_model, gt, thr, "confidence") == pytest.approx(1.0)
    untuned = fused_map(per_model, gt, {m: v[0] for m, v in quantile_grid(per_model, levels).items()}, "confidence")
    assert untuned < 0.5  # the distractors outrank every copy
    assert thr["A"] in quantile_grid(per_model, levels)["A"]


def test_tuned_is_never_worse_than_untuned_and_explicit_grid_is_used():
    per_model, gt = two_model_case(1)
    grid = {"A": [0.0, 0.3, 0.55, 0.9], "B": [0.0, 0.95]}
    thr = tune_thresholds(per_model, gt, "confidence", grid)
    assert thr == {"A": 0.55, "B": 0.0}  # 0.55 is the only value separating A's scores
    for rule in ("confidence", "completeness"):
        tuned = tune_thresholds(per_model, gt, rule, grid)
        assert fused_map(per_model, gt, tuned, rule) >= fused_map(per_model, gt, {"A": 0.0, "B": 0.0}, rule)
    fused = fuse_models(per_model, thr, "confidence")
    assert all(r.startswith("r") for r in fused.column("reference_id").to_pylist())


def test_tune_beta_picks_the_smallest_beta_that_fixes_biased_queries():
    """Copies score 0.6 with query bias 0.1; distractor queries score 0.8 with bias 0.7.
    score - beta*bias ranks every copy first iff 0.8 - 0.7b < 0.6 - 0.1b, i.e. b > 1/3."""
    rows, bias = [], []
    for q in range(4):
        rows.append((f"q{q}", 0, f"r{q}", 0, "m", 0.6))
        rows.append((f"d{q}", 0, f"x{q}", 0, "m", 0.8))
        bias += [(f"q{q}", 0, 0.1), (f"d{q}", 0, 0.7)]
    cands = pa.Table.from_pylist([dict(zip(CANDIDATES_SCHEMA.names, r)) for r in rows], CANDIDATES_SCHEMA)
    bias_t = pa.table({"image_id": [b[0] for b in bias], "patch_id": pa.array([b[1] for b in bias], pa.int32()),
                       "bias": pa.array([b[2] for b in bias], pa.float32())})
    gt = [(f"q{q}", f"r{q}") for q in range(4)]
    beta, best = tune_beta(cands, bias_t, gt, [0.0, 0.25, 0.5, 1.0])
    assert (beta, best) == (0.5, pytest.approx(1.0))
    assert tune_beta(cands, bias_t, gt, [0.0])[1] < 0.5
    assert normalize_scores(cands, bias_t, beta).num_rows == cands.num_rows


def test_threshold_at_precision_is_the_r_at_p_operating_point():
    from core.metrics import evaluate
    from ensemble.tune import threshold_at_precision

    # scores high to low: T T F T F F ; 4 GT pairs (one never predicted)
    q = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    r = np.array(["A", "B", "X", "D", "Y", "Z"], dtype=object)
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    m = evaluate([("a", "A"), ("b", "B"), ("d", "D"), ("g", "G")], q, r, s)
    assert threshold_at_precision(m, 0.9) == (0.8, 0.5)  # 3/4 at 0.6 is below 0.9
    assert threshold_at_precision(m, 0.75) == (0.6, 0.75)
    assert threshold_at_precision(m, 0.9) == (m.threshold_at_p90, m.recall_at_p90)
    assert threshold_at_precision(evaluate([("a", "Q")], q, r, s), 0.9) == (None, 0.0)


def test_tune_fusion_offers_members_calibrated_on_their_background():
    """A's non-copies score up to 0.02 (tail scale 0.01), B's up to 0.08 (scale 0.04). Raw max ranks
    B's non-copy n0 above A's copy q0; on one scale (A x2, B x0.5) both copies come first."""
    from ensemble.tune import Member, Setting, per_model_scores, setting_map, tune_fusion

    def member(key, scores, scale):
        rows = [{"query_id": q, "query_patch": 0, "reference_id": r, "reference_patch": 0, "model": key, "score": s}
                for (q, r), s in scores.items()]
        return Member(key, pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA), None, scale)

    pairs = [("q0", "r0"), ("q1", "r1"), ("n0", "r5"), ("n1", "r6")]
    a = member("A", dict(zip(pairs, [0.05, 0.0, 0.02, 0.015])), 0.01)
    b = member("B", dict(zip(pairs, [0.0, 0.15, 0.08, 0.01])), 0.04)
    gt = pairs[:2]
    start = Setting(0.0, "max", {})
    assert setting_map([a, b], gt, start, Ranking(5)) < 1.0
    calibrated = Setting(0.0, "max", {}, {"A": 2.0, "B": 0.5})
    assert setting_map([a, b], gt, calibrated, Ranking(5)) == pytest.approx(1.0)
    tuned = tune_fusion([a, b], gt, start, Ranking(5))
    assert setting_map([a, b], gt, tuned, Ranking(5)) == pytest.approx(1.0)
    assert per_model_scores([a, b], 0.0).num_rows == 8
    unscaled = [Member(m.key, m.candidates, None) for m in (a, b)]
    assert tune_fusion(unscaled, gt, start, Ranking(5)).factors == {}  # no background: no calibration offered


def test_settings_are_scored_on_predictions_ranked_and_demoted_as_the_run_writes_them():
    """q1's copy r2 (0.50) is below q1's best (0.90): demoted by 0.1 x 0.90 it falls under q3's
    non-copy (0.45), which is q3's best and keeps its score. The μAP a setting is tuned on is
    the μAP of those predictions, not of the undemoted ones."""
    pred = pa.table({"query_id": ["q1", "q1", "q2", "q3", "q3"], "reference_id": ["r1", "r2", "r3", "x", "y"],
                     "score": pa.array([0.90, 0.50, 0.55, 0.45, 0.20], pa.float32())})
    gt = [("q1", "r2"), ("q2", "r3")]
    written = demote_others(top_k_per_query(pred, 2), 0.1)
    assert predictions_map(pred, gt, Ranking(2, 0.1)) == pytest.approx(evaluate_table(gt, written).micro_ap)
    assert predictions_map(pred, gt, Ranking(2, 0.1)) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert predictions_map(pred, gt, Ranking(2)) == pytest.approx((1 / 2 + 2 / 3) / 2)
