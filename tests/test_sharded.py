"""Sharded search: the shard plan, the merge, and exact shards == one flat index."""
import numpy as np
import pytest

from core.knn import IndexSpec, build_index, knn, merge_topk
from core.store import features_table, write_table
from ensemble.sharded import ShardedIndex, ShardIndex, Slice, count_rows, hits_table, plan_shards


def unit(rng, n, d=32):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_refs(tmp_path, x, rows_per_file):
    paths = []
    for i, start in enumerate(range(0, len(x), rows_per_file)):
        block = x[start:start + rows_per_file]
        ids = [f"R{start + j:05d}" for j in range(len(block))]
        path = str(tmp_path / f"reference-{i:05d}.parquet")
        write_table(features_table(ids, [7] * len(block), "m", 64, block), path)
        paths.append(path)
    return paths


def test_plan_shards_covers_every_row_once():
    shards = plan_shards([("a", 5), ("b", 0), ("c", 7)], 4)
    assert [[(s.path, s.start, s.stop) for s in sh] for sh in shards] == [
        [("a", 0, 4)], [("a", 4, 5), ("c", 0, 3)], [("c", 3, 7)]]
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards([("a", 1)], 0)


def test_merge_topk_matches_a_global_sort():
    rng = np.random.default_rng(0)
    parts = []
    for s in range(3):
        sc = -np.sort(-rng.random((4, 5)).astype(np.float32), axis=1)
        parts.append((sc, np.full((4, 5), f"s{s}", object), np.tile(np.arange(5, dtype=np.int32), (4, 1))))
    scores, img, patch = merge_topk(parts, 6)
    allsc = np.concatenate([p[0] for p in parts], axis=1)
    np.testing.assert_array_equal(scores, -np.sort(-allsc, axis=1)[:, :6])
    # each merged hit carries the ids of the shard it came from
    for q in range(4):
        for j in range(6):
            s = int(img[q, j][1])
            assert parts[s][0][q, patch[q, j]] == scores[q, j]


def test_shard_index_reads_only_its_rows_and_pads(tmp_path):
    rng = np.random.default_rng(1)
    x = unit(rng, 10)
    paths = write_refs(tmp_path, x, 4)
    assert count_rows(paths) == [4, 4, 2]
    shard = ShardIndex([Slice(paths[0], 3, 4), Slice(paths[1], 0, 2)], "flat", IndexSpec(), k_max=5)
    assert shard.rows == 3 and list(shard.image_ids) == ["R00003", "R00004", "R00005"]
    scores, img, patch = shard.search(x[[4]], 5)      # k clipped to the 3 rows
    assert img[0, 0] == "R00004" and scores.shape == (1, 3) and np.isclose(scores[0, 0], 1.0)


def test_approximate_indexes_find_the_exact_copy():
    rng = np.random.default_rng(2)
    x = unit(rng, 1000, 32)
    for kind, refine, name in [("ivfpq", "none", "IndexIVFPQ"), ("ivfpq", "sq8", "IndexRefine"),
                               ("ivfpq", "flat", "IndexRefine"), ("hnsw", "sq8", "IndexHNSWFlat")]:
        index = build_index(x, kind, IndexSpec(kind=kind, nlist=16, nprobe=16, pq_m=8, refine=refine), k_max=1)
        assert type(index).__name__ == name
        _, idx = index.search(x[:50], 1)
        assert (idx[:, 0] == np.arange(50)).mean() >= (0.9 if refine == "none" else 0.98)
    with pytest.raises(ValueError, match="pq_m"):
        build_index(x, "ivfpq", IndexSpec(pq_m=7))
    with pytest.raises(ValueError, match="unknown refine"):
        build_index(x, "ivfpq", IndexSpec(pq_m=8, refine="pq"))


def test_exact_shards_equal_one_flat_index(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    x, q = unit(rng, 300), unit(rng, 40)
    paths = write_refs(tmp_path, x, 70)
    index = ShardedIndex(paths, IndexSpec(), shard_size=128, k_max=10, actor_options={"num_cpus": 0.25},
                         timeout_s=120)
    try:
        assert len(index.actors) == 3 and index.rows == 300
        infos = index.info()
        assert [i["rows"] for i in infos] == [128, 128, 44]
        assert all(i["index"] == "flat" and i["faiss"] == "IndexFlatIP" and i["rss"] > 10 * 2**20 for i in infos)
        scores, img, _ = index.search(q, 10)
    finally:
        index.close()
    want_scores, want_idx = knn(q, x, 10)
    assert (img == np.vectorize(lambda i: f"R{i:05d}")(want_idx)).all()
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    table = hits_table(features_table([f"Q{i}" for i in range(40)], [0] * 40, "m", 64, q), (scores, img, _), "m")
    assert table.num_rows == 400 and table.column("reference_patch").to_pylist() == [7] * 400


def test_whole_only_shards_index_patch_zero_only(tmp_path):
    rng = np.random.default_rng(3)
    x = unit(rng, 6)
    path = str(tmp_path / "reference-00000.parquet")
    write_table(features_table(["R0", "R0", "R0", "R1", "R1", "R1"], [0, 1, 2, 0, 1, 2], "m", 64, x), path)
    shard = ShardIndex([Slice(path, 0, 6)], "flat", IndexSpec(), k_max=5, whole_only=True)
    assert shard.rows == 2 and list(shard.patch_ids) == [0, 0]
    scores, img, patch = shard.search(x[[1]], 5)  # a tile's own vector finds only whole images
    assert scores.shape == (1, 2) and set(patch[0]) == {0}
    tiles = ShardIndex([Slice(path, 1, 3)], "flat", IndexSpec(), k_max=5, whole_only=True)  # rows without a patch 0
    assert tiles.rows == 0 and tiles.search(x[[0]], 5)[0].shape == (1, 0)


def test_sharded_whole_only_merges_shards_without_whole_rows(ray_local, tmp_path):
    rng = np.random.default_rng(4)
    x = unit(rng, 6)
    path = str(tmp_path / "reference-00000.parquet")
    write_table(features_table(["R0", "R0", "R0", "R1", "R1", "R1"], [0, 1, 2, 0, 1, 2], "m", 64, x), path)
    index = ShardedIndex([path], IndexSpec(), shard_size=2, k_max=3, actor_options={"num_cpus": 0.25},
                         whole_only=True)  # shards: rows 0-1, 2-3, 4-5; the last has no patch 0
    try:
        assert index.rows == 2
        scores, img, patch = index.search(x[[3]], 3)
        assert list(img[0]) == ["R1", "R0"] and list(patch[0]) == [0, 0] and np.isclose(scores[0, 0], 1.0)
    finally:
        index.close()
