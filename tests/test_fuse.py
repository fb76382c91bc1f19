"""Patch max, model fusion rules and top-k on hand-made tables with known answers."""
from __future__ import annotations

import pyarrow as pa
import pytest

from core.contracts import CANDIDATES_SCHEMA
from ensemble.fuse import RULES, fuse_models, max_over_patches, top_k_per_query


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
