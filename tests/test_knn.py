"""core.knn against brute-force numpy on random L2-normalised vectors."""
from __future__ import annotations

import numpy as np
import pytest

from core.knn import IndexSpec, index_kind, knn, l2_normalize, merge_topk


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
def test_blocks_merged_equal_single_flat_index(k):
    """Per-block top-k lists merged by merge_topk (the sharded search's path) = one flat index."""
    rng = np.random.default_rng(2)
    q, db = unit(rng, 12), unit(rng, 40)
    bounds = [(0, 7), (7, 30), (30, 40)]  # uneven blocks
    parts = []
    for a, b in bounds:
        s, i = knn(q, db[a:b], k)
        parts.append((s, i + a, np.zeros_like(i)))
    scores, idx, _ = merge_topk(parts, k)
    want_s, want_i = knn(q, db, k)
    assert idx.shape == (12, min(k, 40))
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)


def test_index_kind_is_decided_for_the_whole_set():
    spec = IndexSpec(exact_max=100, kind="hnsw")
    assert index_kind(99, spec) == "flat" and index_kind(100, spec) == "hnsw"
    with pytest.raises(ValueError, match="unknown index kind"):
        index_kind(10, IndexSpec(kind="lsh"))


def test_l2_normalize_unit_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
    assert l2_normalize(x).dtype == np.float32


def test_bad_arguments():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(unit(rng, 2, 8), unit(rng, 3, 16), 1)
    with pytest.raises(ValueError, match="k must be"):
        knn(unit(rng, 2), unit(rng, 3), 0)
