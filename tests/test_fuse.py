"""Patch max, model fusion rules and top-k on hand-made tables with known answers."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.contracts import CANDIDATES_SCHEMA
from ensemble.calibrate import member_factors, tail_scale
from ensemble.fuse import (RULES, calibrate, demote_others, fuse, fuse_models, max_over_patches, mean_over_models,
                           top_k_per_query)


def as_dict(table: pa.Table, *keys: str) -> dict:
    return {tuple(r[k] for k in keys): pytest.approx(r["score"]) for r in table.to_pylist()}


def test_max_over_patches_per_model():
    rows = [  # query_id, query_patch, reference_id, reference_patch, model, score
        ("q1", 0, "r1", 0, "a", 0.2), ("q1", 3, "r1", 0, "a", 0.9), ("q1", 0, "r1", 2, "a", 0.5),
        ("q1", 1, "r1", 1, "b", 0.4), ("q1", 0, "r2", 0, "a", 0.3), ("q2", 2, "r1", 5, "a", 0.7),
    ]
    cands = pa.Table.from_pylist([dict(zip(CANDIDATES_SCHEMA.names, r)) for r in rows], CANDIDATES_SCHEMA)
    out = max_over_patches(cands)
    assert out.column_names == ["query_id", "reference_id", "score", "model"]
    assert as_dict(out, "query_id", "reference_id", "model") == {
        ("q1", "r1", "a"): 0.9, ("q1", "r1", "b"): 0.4, ("q1", "r2", "a"): 0.3, ("q2", "r1", "a"): 0.7}
    plain = max_over_patches(cands.drop_columns(["model"]))
    assert plain.column_names == ["query_id", "reference_id", "score"]
    assert as_dict(plain, "query_id", "reference_id") == {
        ("q1", "r1"): 0.9, ("q1", "r2"): 0.3, ("q2", "r1"): 0.7}


PER_MODEL = pa.table({
    "query_id": ["q1", "q1", "q1", "q1", "q2", "q2", "q2", "q3", "q3", "q3", "q3", "q3"],
    "reference_id": ["r1", "r1", "r2", "r2", "r1", "r3", "r3", "r1", "r1", "r1", "r2", "r2"],
    "model": ["A", "B", "A", "B", "A", "A", "B", "C", "A", "B", "A", "B"],
    "score": pa.array([0.8, 0.6, 0.9, 0.75, 0.6, 0.3, 0.2, 0.95, 0.55, 0.71, 0.7, 0.7], pa.float32()),
})
THRESHOLDS = {"A": 0.5, "B": 0.7}  # C is not listed: it counts for the max, never for the test


@pytest.mark.parametrize("rule, expected", [
    # every pair, max over models
    ("max", {("q1", "r1"): 0.8, ("q1", "r2"): 0.9, ("q2", "r1"): 0.6, ("q2", "r3"): 0.3,
             ("q3", "r1"): 0.95, ("q3", "r2"): 0.7}),
    # q1/r1: B 0.6 < 0.7 -> dropped; q2/r1: B missing -> dropped; q2/r3: both below -> dropped;
    # q3/r2: B exactly at its threshold (float32 0.7 vs configured 0.7) -> kept
    ("confidence", {("q1", "r2"): 0.9, ("q3", "r1"): 0.95, ("q3", "r2"): 0.7}),
    # any listed model clearing its threshold is enough; only q2/r3 fails for both
    ("completeness", {("q1", "r1"): 0.8, ("q1", "r2"): 0.9, ("q2", "r1"): 0.6,
                      ("q3", "r1"): 0.95, ("q3", "r2"): 0.7}),
])
def test_fuse_rules(rule, expected):
    out = fuse_models(PER_MODEL, THRESHOLDS, rule)
    assert out.column_names == ["query_id", "reference_id", "score"]
    assert as_dict(out, "query_id", "reference_id") == expected


def test_unknown_rule_lists_known_rules():
    with pytest.raises(ValueError, match="unknown fusion rule 'mean'.*completeness.*confidence.*max"):
        fuse_models(PER_MODEL, THRESHOLDS, "mean")
    assert set(RULES) == {"max", "confidence", "completeness"}


def test_threshold_rules_need_thresholds():
    with pytest.raises(ValueError, match="needs a threshold"):
        fuse_models(PER_MODEL, {}, "confidence")


def test_top_k_per_query_is_sorted_and_stable():
    pred = pa.table({"query_id": ["q2", "q1", "q2", "q1", "q1", "q2", "q1"],
                     "reference_id": ["a", "b", "c", "d", "e", "f", "g"],
                     "score": [0.5, 0.1, 0.9, 0.7, 0.7, 0.5, 0.3]})
    out = top_k_per_query(pred, 2)
    # q1: d and e tie at 0.7 -> input order d, e; q2: c 0.9 then a/f tie at 0.5 -> a first
    assert list(zip(out["query_id"].to_pylist(), out["reference_id"].to_pylist())) == [
        ("q1", "d"), ("q1", "e"), ("q2", "c"), ("q2", "a")]
    assert top_k_per_query(pred, 10).num_rows == 7
    assert top_k_per_query(pred.slice(0, 0), 3).num_rows == 0


def test_calibrate_scales_each_listed_model():
    out = calibrate(PER_MODEL, {"A": 2.0, "B": 0.5})
    got = {(r["query_id"], r["reference_id"], r["model"]): r["score"] for r in out.to_pylist()}
    assert got[("q1", "r1", "A")] == pytest.approx(1.6) and got[("q1", "r1", "B")] == pytest.approx(0.3)
    assert got[("q3", "r1", "C")] == pytest.approx(0.95)  # unlisted: factor 1
    assert out.schema == PER_MODEL.schema and calibrate(PER_MODEL, {}) is PER_MODEL


def test_mean_over_models_fills_a_missing_pair_with_the_models_lowest_score_for_that_query():
    per_model = pa.table({
        "query_id": ["q1", "q1", "q1", "q2"],
        "reference_id": ["r1", "r1", "r2", "r1"],
        "model": ["A", "B", "A", "A"],
        "score": pa.array([0.8, 0.6, 0.5, 0.4], pa.float32()),
    })
    out = as_dict(mean_over_models(per_model), "query_id", "reference_id")
    # q1-r2: B did not return it, counts with B's lowest q1 score (0.6); q2: B has no pair at all,
    # counts with B's lowest score overall (0.6)
    assert out == {("q1", "r1"): pytest.approx(0.7), ("q1", "r2"): pytest.approx(0.55),
                   ("q2", "r1"): pytest.approx(0.5)}
    fused = fuse(per_model, {}, "mean", {"A": 2.0})
    assert as_dict(fused, "query_id", "reference_id")[("q1", "r1")] == pytest.approx((1.6 + 0.6) / 2)


def test_member_factors_put_members_on_one_scale():
    rng = np.random.default_rng(0)
    wide = np.sort(rng.gumbel(0.0, 0.04, (200, 10)), axis=1)[:, ::-1]  # a member with a wide null tail
    narrow = wide / 4
    assert tail_scale(wide) == pytest.approx(4 * tail_scale(narrow))
    factors = member_factors({"wide": tail_scale(wide), "narrow": tail_scale(narrow)})
    assert factors["narrow"] == pytest.approx(4 * factors["wide"]) and np.prod(list(factors.values())) == \
        pytest.approx(1.0)
    assert member_factors({"only": 0.03}) == {"only": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="must be > 0"):
        member_factors({"a": 0.0})
    assert 0.01 < tail_scale(wide) < 0.1  # of the order of the Gumbel scale 0.04


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_fuse_stage_streams_query_shards_and_equals_fusing_everything(tmp_path, rule, monkeypatch):
    from core.store import write_table
    from jobs.config import load_config
    from jobs.layout import RunDir
    from jobs.stages import fuse as stage
    from jobs.stages.fuse import query_shards, run_fuse

    monkeypatch.setattr(stage, "require_candidates", lambda *a: None)  # candidates only: no upstream folders here

    cfg = load_config(None, [f"output={tmp_path}", "models.0.name=tiny_cnn", "models.0.scales=[64, 96]",
                             f"fuse.rule={rule}", "fuse.k=3", "fuse.calibration={tiny_cnn@96: 1.5}"])
    run, keys, rng = RunDir(str(tmp_path)), cfg.search_keys(), np.random.default_rng(0)
    files = {"query-00000-0000.parquet": ["q0", "q1"], "query-00000-0001.parquet": ["q2"],
             "query-00001-0000.parquet": ["q3", "q4"]}
    everything = []
    for key in keys:
        for name, queries in files.items():
            n = 12 * len(queries)
            t = pa.table({"query_id": rng.choice(queries, n), "query_patch": rng.integers(0, 3, n, dtype=np.int32),
                          "reference_id": rng.choice([f"r{i}" for i in range(6)], n),
                          "reference_patch": np.zeros(n, np.int32), "model": [key] * n,
                          "score": rng.random(n, dtype=np.float32)}, schema=CANDIDATES_SCHEMA)
            write_table(t, f"{run.candidates(key)}/{name}")
            everything.append(t)
    assert list(query_shards(run, keys)) == ["query-00000", "query-00001"]
    per_model = max_over_patches(pa.concat_tables(everything))
    expected = top_k_per_query(fuse(per_model, {}, rule, cfg.fuse.calibration), 3)
    got = run_fuse(cfg, run)
    assert got.num_rows == expected.num_rows == 15
    assert got.to_pylist() == expected.to_pylist()


def test_a_query_s_other_candidates_lose_a_share_of_its_best():
    """Below each query's best, scores drop by share x best (a best <= 0 takes nothing); bests,
    ties with them, the order within a query and the row order are kept."""
    pred = pa.table({"query_id": ["a", "b", "a", "a", "b", "c"], "reference_id": list("rstuvw"),
                     "score": pa.array([0.5, -0.2, 0.3, 0.5, -0.4, 0.1], pa.float32())})
    out = demote_others(pred, 0.2)
    assert out.column_names == pred.column_names and out.schema == pred.schema
    np.testing.assert_allclose(out.column("score").to_numpy(), [0.5, -0.2, 0.2, 0.5, -0.4, 0.1], atol=1e-7)
    assert demote_others(pred, 0.0) is pred
    chunked = pa.concat_tables([pred.slice(0, 2), pred.slice(2)])
    assert demote_others(chunked, 0.2).column("score").to_pylist() == out.column("score").to_pylist()


def test_decoys_are_lowered_below_the_query_s_best_prediction():
    """With ``rivals``, a row is lowered below the best of its query's rows and rivals together; a
    row above every rival is that query's best and keeps its score. Rivals are not returned."""
    decoys = pa.table({"query_id": ["a", "a", "b"], "reference_id": ["t1", "t2", "t3"],
                       "score": pa.array([0.4, 0.2, 0.6], pa.float32())})
    preds = pa.table({"query_id": ["a", "b", "c"], "reference_id": ["r1", "r2", "r3"],
                      "score": pa.array([0.8, 0.3, 0.9], pa.float32())})
    out = demote_others(decoys, 0.25, preds)
    assert out.column("reference_id").to_pylist() == ["t1", "t2", "t3"]
    np.testing.assert_allclose(out.column("score").to_numpy(), [0.2, 0.0, 0.6], atol=1e-7)
