"""PCA / whitening fit on training features (a bounded sample), safetensors round trip, member concatenation."""
from __future__ import annotations

import numpy as np
import pytest

from core.store import embeddings_from_arrow, features_table, read_table, write_table
from ensemble.reduce import concat_members, fit_pca, l2_normalize, load_pca, save_pca
from jobs.config import ReduceConfig
from jobs.layout import RunDir
from jobs.stages.reduce import fit_or_load, train_sample


def anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Descriptors with a decaying spectrum and an offset mean (like real ones)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.linspace(3.0, 0.1, d) + 0.5).astype(np.float32)


def test_whitening_gives_identity_covariance_on_training_data():
    x = anisotropic(300, 16)
    pca = fit_pca(x, 8, whiten=True)
    y = (x - pca.mean) @ pca.matrix.T
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)
    # without whitening the variances are the leading eigenvalues of the covariance, decreasing
    plain = fit_pca(x, 8, whiten=False)
    y = (x - plain.mean) @ plain.matrix.T
    brute = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1][:8]
    np.testing.assert_allclose(y.var(axis=0), brute, rtol=1e-3)
    np.testing.assert_allclose(plain.eigenvalues, brute, rtol=1e-3)
    np.testing.assert_allclose(plain.matrix @ plain.matrix.T, np.eye(8), atol=1e-4)  # orthonormal rows


@pytest.mark.parametrize("whiten", [False, True])
def test_apply_respects_dim_and_normalises(whiten):
    pca = fit_pca(anisotropic(100, 12), 5, whiten=whiten)
    out = pca.apply(anisotropic(7, 12, seed=1))
    assert out.shape == (7, 5) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(n, 12\)"):
        pca.apply(np.zeros((3, 11), np.float32))


def test_bad_dims_are_rejected():
    x = anisotropic(20, 8)
    with pytest.raises(ValueError, match="dim=9"):
        fit_pca(x, 9, whiten=False)
    with pytest.raises(ValueError, match="zero variance"):  # 5 centred points have rank 4
        fit_pca(x[:5], 5, whiten=True)


def test_apply_through_parquet_matches_in_memory(tmp_path):
    train, feats = anisotropic(200, 16), l2_normalize(anisotropic(30, 16, seed=2))
    pca = fit_pca(train, 6, whiten=True, key="m@224")
    table = features_table([f"i{j}" for j in range(30)], range(30), "m", 224, feats)
    write_table(table, tmp_path / "f" / "query-00000.parquet")
    out = pca.apply_table(read_table(tmp_path / "f"))
    assert out.column_names == table.column_names
    assert out.schema.field("embedding").type.list_size == 6
    assert out.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    np.testing.assert_allclose(embeddings_from_arrow(out.column("embedding")), pca.apply(feats), atol=1e-6)


def test_save_load_gives_identical_output(tmp_path):
    x = anisotropic(100, 16)
    pca = fit_pca(x, 8, whiten=True, key="resnet18@224")
    back = load_pca(save_pca(pca, tmp_path / "pca" / "resnet18@224.safetensors"))
    assert (back.dim, back.whiten, back.key) == (8, True, "resnet18@224")
    np.testing.assert_array_equal(back.apply(x), pca.apply(x))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_pca(tmp_path / "junk.safetensors")


def test_concat_members_joins_on_image_and_patch():
    rng = np.random.default_rng(3)
    a, b = l2_normalize(rng.normal(size=(4, 3))), l2_normalize(rng.normal(size=(4, 5)))
    ids, patches = ["x", "x", "y", "z"], [0, 1, 0, 0]
    ta = features_table(ids, patches, "a", 224, a)
    order = [2, 0, 3, 1]  # the second member lists the same rows in another order
    tb = features_table([ids[i] for i in order], [patches[i] for i in order], "b", 160, b[order])
    out = concat_members([ta, tb])
    assert out.column("image_id").to_pylist() == ids and out.column("patch_id").to_pylist() == patches
    assert set(out.column("model").to_pylist()) == {"a@224+b@160"}
    np.testing.assert_allclose(embeddings_from_arrow(out.column("embedding")),
                               np.concatenate([a, b], axis=1) / np.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="member 1 has 3 rows"):
        concat_members([ta, tb.slice(0, 3)])


def test_pca_is_fit_on_every_nth_train_row_read_shard_by_shard(tmp_path):
    run = RunDir(str(tmp_path))
    x = anisotropic(50, 6)
    for i, (a, b) in enumerate([(0, 17), (17, 40), (40, 50)]):  # shard sizes that the stride crosses
        write_table(features_table([f"t{j}" for j in range(a, b)], [0] * (b - a), "m", 64, x[a:b]),
                    f"{run.features('m@64')}/train-{i:05d}-0000.parquet")
    np.testing.assert_array_equal(train_sample(run, ["m@64"], [f"train-{i:05d}-0000.parquet" for i in range(3)], 12),
                                  x[::5])  # 50 rows, at most 12: every 5th
    pca, train = fit_or_load(run, ["m@64"], "m@64~pca3w", ReduceConfig(dim=3, fit_rows=12))
    assert train is None  # without stretching no train descriptor is held
    np.testing.assert_allclose(pca.matrix, fit_pca(x[::5], 3, True).matrix, rtol=1e-4, atol=1e-5)
    _, train = fit_or_load(run, ["m@64"], "m@64~pca3w", ReduceConfig(dim=3, fit_rows=12, stretch=True))
    assert train.shape == (50, 3)  # stretching pushes away from every train descriptor
    # fit while stretching (every descriptor read once): the same sample, the same PCA
    (tmp_path / "reduce" / "m@64~pca3w.safetensors").unlink()
    again, train = fit_or_load(run, ["m@64"], "m@64~pca3w", ReduceConfig(dim=3, fit_rows=12, stretch=True))
    np.testing.assert_array_equal(again.matrix, pca.matrix)
    np.testing.assert_allclose(train, again.apply(x), rtol=1e-6)
