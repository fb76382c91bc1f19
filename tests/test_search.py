"""faiss kNN helpers against brute-force numpy on random L2-normalised vectors."""
from __future__ import annotations

import numpy as np
import pytest

from ensemble.search import knn, knn_blocks, search_tables
from ensemble.store import CANDIDATES_SCHEMA, features_table


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    q, db = unit(rng, 20), unit(rng, 300)
    scores, idx = knn(q, db, 7)
    want_s, want_i = brute_force(q, db, 7)
    assert idx.shape == (20, 7)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_k_larger_than_database_is_clipped():
    rng = np.random.default_rng(1)
    q, db = unit(rng, 5), unit(rng, 4)
    scores, idx = knn(q, db, 10)
    assert idx.shape == (5, 4) and (idx >= 0).all()
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(4), (5, 1)))
    np.testing.assert_array_equal(idx, brute_force(q, db, 4)[1])


@pytest.mark.parametrize("k", [3, 50])
def test_blocks_equal_single_flat_index(k):
    rng = np.random.default_rng(2)
    q, db = unit(rng, 12), unit(rng, 40)
    blocks = [db[:7], db[7:7], db[7:30], db[30:]]  # uneven, one empty
    scores, idx = knn_blocks(q, iter(blocks), k)
    want_s, want_i = knn(q, db, k)
    assert idx.shape == (12, min(k, 40))
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)


def test_bad_arguments():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(unit(rng, 2, 8), unit(rng, 3, 16), 1)
    with pytest.raises(ValueError, match="k must be"):
        knn(unit(rng, 2), unit(rng, 3), 0)


def test_search_tables_rows_and_ids():
    rng = np.random.default_rng(4)
    q, db = unit(rng, 3), unit(rng, 6)
    queries = features_table(["qa", "qa", "qb"], [0, 1, 0], "m", 224, q)
    refs = features_table(["r0", "r0", "r1", "r1", "r2", "r2"], [0, 1, 0, 1, 0, 1], "m", 224, db)
    cands = search_tables(queries, refs, k=2, model="resnet@224")
    assert cands.schema == CANDIDATES_SCHEMA and cands.num_rows == 6
    _, want_i = brute_force(q, db, 2)
    rows = cands.to_pylist()
    for n, row in enumerate(rows):
        i, j = divmod(n, 2)
        assert (row["query_id"], row["query_patch"]) == (["qa", "qa", "qb"][i], [0, 1, 0][i])
        ref = want_i[i, j]
        assert (row["reference_id"], row["reference_patch"]) == (f"r{ref // 2}", ref % 2)
        assert row["model"] == "resnet@224"
        assert row["score"] == pytest.approx(float(q[i] @ db[ref]), abs=1e-5)
