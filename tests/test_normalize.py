"""Score normalisation: neighbour similarity vs brute force, hub queries are penalised more."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.contracts import CANDIDATES_SCHEMA
from core.store import features_table
from ensemble.normalize import bias_table, neighbour_similarity, normalize_scores


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_neighbour_similarity_is_mean_of_top_n():
    rng = np.random.default_rng(0)
    q, train = unit(rng.standard_normal((6, 8))), unit(rng.standard_normal((30, 8)))
    want = np.sort(q @ train.T, axis=1)[:, ::-1][:, :3].mean(axis=1)
    np.testing.assert_allclose(neighbour_similarity(q, train, n=3), want, atol=1e-5)
    with pytest.raises(ValueError, match="neighbours n=31"):
        neighbour_similarity(q, train, n=31)


def make_case():
    rng = np.random.default_rng(1)
    hub = unit([[1, 0, 0, 0]])
    # training set: many images near the hub direction, none near the 'rare' query
    train = unit(hub + 0.05 * rng.standard_normal((20, 4)))
    queries = features_table(["hub", "rare"], [0, 0], "m", 224, unit([[1, 0.02, 0, 0], [0, 0, 1, 0.1]]))
    cands = pa.Table.from_pylist([
        dict(query_id="hub", query_patch=0, reference_id="r1", reference_patch=0, model="m", score=0.6),
        dict(query_id="rare", query_patch=0, reference_id="r1", reference_patch=0, model="m", score=0.6),
        dict(query_id="hub", query_patch=0, reference_id="r2", reference_patch=1, model="m", score=0.4),
    ], CANDIDATES_SCHEMA)
    return queries, train, cands


def test_query_near_many_training_images_is_lowered_more():
    queries, train, cands = make_case()
    bias = bias_table(queries, train, n=5)
    b = dict(zip(bias["image_id"].to_pylist(), bias["bias"].to_pylist()))
    assert b["hub"] > 0.9 and b["rare"] < 0.2
    out = normalize_scores(cands, bias, beta=0.5)
    assert out.schema == CANDIDATES_SCHEMA
    np.testing.assert_allclose(out["score"].to_numpy(),
                               [0.6 - 0.5 * b["hub"], 0.6 - 0.5 * b["rare"], 0.4 - 0.5 * b["hub"]], atol=1e-6)
    hub_score, rare_score = out["score"].to_pylist()[:2]
    assert rare_score > hub_score  # equal raw scores: the hub query now ranks below


def test_beta_zero_is_identity():
    queries, train, cands = make_case()
    assert normalize_scores(cands, bias_table(queries, train), beta=0.0).equals(cands)


def test_missing_or_duplicate_bias_rows():
    queries, train, cands = make_case()
    bias = bias_table(queries, train)
    with pytest.raises(ValueError, match="no entry for 1 candidate rows.*'rare'"):
        normalize_scores(cands, bias.slice(0, 1), beta=1.0)
    with pytest.raises(ValueError, match="appears more than once"):
        normalize_scores(cands, pa.concat_tables([bias, bias]), beta=1.0)
