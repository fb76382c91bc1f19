"""Parquet contracts: feature round trip, atomic writes, shard listing."""
import numpy as np
import pyarrow as pa
import pytest

from core import contracts, store


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("float16", 1e-3)])
def test_features_round_trip_through_parquet(tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 24)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    t = store.features_table([f"q{i}" for i in range(7)], range(7), "resnet18", 224, emb, dtype)
    path = store.write_table(t, tmp_path / "feats" / contracts.shard_file("query", 0))
    back = store.read_table(path)
    assert back.schema.equals(contracts.features_schema(24, dtype))
    np.testing.assert_allclose(store.embeddings_from_arrow(back.column("embedding")), emb, atol=tol)
    assert back.column("image_id").to_pylist() == [f"q{i}" for i in range(7)]
    assert set(back.column("scale").to_pylist()) == {224}


def test_write_is_atomic_and_temp_files_are_not_shards(tmp_path):
    t = pa.table({"a": [1, 2]})
    store.write_table(t, tmp_path / "part-00001.parquet")
    (tmp_path / ".part-00002.parquet.abcd.tmp").write_bytes(b"half written")
    assert [p.rsplit("/", 1)[-1] for p in store.list_shards(tmp_path)] == ["part-00001.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and "part-00001" in p.name]


def test_missing_table_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        store.read_table(tmp_path / "nothing-here.parquet")


def test_chunks_cover_the_range():
    assert list(store.chunks(5, 2)) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]


def test_folder_bytes_counts_nested_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.bin").write_bytes(b"1" * 10)
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"2" * 32)
    assert store.folder_bytes(tmp_path / "a") == 42
    assert store.folder_bytes(tmp_path / "missing") == 0


def test_concat_tables_writes_the_inputs_rows_in_order_one_file_at_a_time(tmp_path, monkeypatch):
    files = [store.write_table(pa.table({"a": [i, i + 1], "b": ["x", "y"]}), tmp_path / f"{i}.parquet")
             for i in (0, 10, 20)]
    read = []
    real = store.read_table
    monkeypatch.setattr(store, "read_table", lambda p, columns=None: read.append(p) or real(p, columns))
    assert store.concat_tables(files, tmp_path / "out" / "all.parquet", ["a"]) == 6
    assert read == files  # each input read once, in order
    assert real(tmp_path / "out" / "all.parquet").to_pydict() == {"a": [0, 1, 10, 11, 20, 21]}
    with pytest.raises(ValueError, match="no input"):
        store.concat_tables([], tmp_path / "none.parquet")
    assert not (tmp_path / "none.parquet").exists() and not list(tmp_path.glob(".none*"))


def test_link_file_shares_the_file_or_copies_it_whole(tmp_path, monkeypatch):
    src = tmp_path / "a.parquet"
    src.write_bytes(b"shard")
    store.link_file(src, tmp_path / "run" / "a.parquet")
    assert (tmp_path / "run" / "a.parquet").samefile(src)

    def no_links(*_):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(store.os, "link", no_links)  # another file system
    store.link_file(src, tmp_path / "other" / "a.parquet")
    copied = tmp_path / "other" / "a.parquet"
    assert copied.read_bytes() == b"shard" and not copied.samefile(src)
    assert [p.name for p in copied.parent.iterdir()] == ["a.parquet"]  # no temp file left
