"""Descriptor stretching: a dense cluster's shared direction is removed, duplicates stay close."""
from __future__ import annotations

import numpy as np
import pytest

from core.store import embeddings_from_arrow, features_table
from ensemble.reduce import l2_normalize
from ensemble.stretch import stretch, stretch_table

D = 32


def cluster_case(seed: int = 0):
    """A dense training cluster around a centre c plus a few unrelated training points.

    Test points are c + small individual offsets: u and v are unrelated members of the
    cluster (independent offsets), a and a2 are near-duplicates (same offset, tiny noise).
    """
    rng = np.random.default_rng(seed)
    c = l2_normalize(rng.normal(size=(1, D)))[0]
    train = np.concatenate([l2_normalize(c + 0.15 * rng.normal(size=(200, D)) / np.sqrt(D)),
                            l2_normalize(rng.normal(size=(50, D)))])
    off = 0.3 * rng.normal(size=(3, D)) / np.sqrt(D)
    a, u, v = (l2_normalize((c + o)[None])[0] for o in off)
    a2 = l2_normalize((c + off[0] + 0.02 * rng.normal(size=D) / np.sqrt(D))[None])[0]
    return train.astype(np.float32), np.stack([a, a2, u, v]).astype(np.float32)


def test_stretch_separates_unrelated_cluster_members_and_keeps_duplicates():
    train, x = cluster_case()
    before = x @ x.T
    after = stretch(x, train, n=10, beta=1.0)
    after = after @ after.T
    assert before[2, 3] > 0.9  # unrelated, but the shared centre makes them look like copies
    assert after[2, 3] < 0.5  # stretching removes the centre: they move apart
    assert after[0, 1] > 0.9  # the near-duplicate pair stays close
    assert after[0, 1] - after[2, 3] > before[0, 1] - before[2, 3] + 0.4  # copies now stand out


def test_beta_zero_is_identity_and_output_is_normalised():
    train, x = cluster_case(1)
    np.testing.assert_allclose(stretch(x, train, 5, 0.0), x, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(stretch(x, train, 5, 0.7), axis=1), 1.0, atol=1e-5)


def test_matches_brute_force_weighted_mean():
    rng = np.random.default_rng(2)
    train, x = l2_normalize(rng.normal(size=(40, 8))), l2_normalize(rng.normal(size=(5, 8)))
    sims = x @ train.T
    expected = []
    for i in range(5):
        nn = np.argsort(-sims[i])[:3]
        w = np.maximum(sims[i, nn], 0)
        expected.append(x[i] - 0.5 * (w[:, None] * train[nn]).sum(0) / max(w.sum(), 1e-12))
    np.testing.assert_allclose(stretch(x, train, 3, 0.5), l2_normalize(np.array(expected)), atol=1e-5)
    with pytest.raises(ValueError, match="n=41"):
        stretch(x, train, 41, 0.5)


def test_stretch_table_keeps_rows_and_schema():
    train, x = cluster_case(3)
    table = features_table(["a", "a2", "u", "v"], [0, 0, 0, 0], "m", 224, x)
    out = stretch_table(table, train, 10, 1.0)
    assert out.schema == table.schema
    assert out.column("image_id").to_pylist() == ["a", "a2", "u", "v"]
    np.testing.assert_allclose(embeddings_from_arrow(out.column("embedding")), stretch(x, train, 10, 1.0), atol=1e-6)
