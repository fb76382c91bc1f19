"""Index versions without the pipeline: shards merged by tier, removed rows never answered,
stale writers refused, prune keeping what kept versions use, the service's id -> path map."""
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.knn import IndexSpec, build_index, l2_normalize
from core.models.cards import ModelCard
from core.store import features_table, read_table, write_table
from ensemble.index import layout, versions
from ensemble.index.layout import IndexDir, IndexFolderError
from ensemble.index.reader import NOTHING, IdPaths, KeyIndex, search_params
from ensemble.index.versions import prune, tier, tier_to_merge


@pytest.mark.parametrize("kind, refine", [("flat", "none"), ("hnsw", "none"), ("ivfpq", "none"), ("ivfpq", "sq8"),
                                          ("ivfpq", "flat")])
def test_search_params_return_only_the_rows_they_keep(kind, refine):
    """Removed rows (each the nearest neighbour of its own query) never come back, on every kind
    (a re-ranked IVF-PQ index, the default past search.exact_max, takes them in its base's parameters)."""
    x = l2_normalize(np.random.default_rng(0).normal(size=(1000, 16)))
    index = build_index(x, kind, IndexSpec(nlist=8, nprobe=8, pq_m=4, refine=refine), k_max=10)
    rows = np.ones(len(x), bool)
    rows[::3] = False  # every third row removed
    _, found = index.search(x[:30], 10, params=search_params(index, rows))
    assert (found >= 0).all() and rows[found].all()
    assert search_params(index, np.ones(len(x), bool)) is None
    assert search_params(index, np.zeros(len(x), bool)) is NOTHING


def test_the_train_background_is_held_once_unless_stretching_asks_for_its_vectors(tmp_path):
    """The train index holds the background; the vectors themselves are read only when asked for."""
    x = l2_normalize(np.random.default_rng(0).normal(size=(50, 8)))
    write_table(features_table([f"T{i}" for i in range(50)], [0] * 50, "m", 64, x), tmp_path / "train.parquet")
    key = KeyIndex(tmp_path, {"dim": 8, "kind": "flat", "shards": [], "train_rows": 50}, set(), IndexSpec(), 3)
    assert "train_x" not in vars(key) and key.train.rows == 50
    assert np.allclose(key.bias(x[:2], 1), 1.0, atol=1e-5)  # each row's nearest background row is itself
    assert np.allclose(key.train_x, x, atol=1e-3)


def test_tier_to_merge_picks_the_smallest_full_tier():
    assert [tier(r, 4) for r in (1, 3, 4, 15, 16, 64)] == [0, 0, 1, 1, 2, 3]

    def rows(*sizes: int, fanout: int = 4) -> list[int]:
        return [s["rows"] for s in tier_to_merge([{"rows": r} for r in sizes], 100, fanout)]
    assert rows(100, 5, 6, 7, 20, 30, 2, 8, 16) == [5, 6, 7, 8]  # tier 1 (4-15); 100 is full, tier 2 has 3
    assert rows(100, 5, 20, 30, 2, 16, 40) == [20, 30, 16, 40]  # tier 1 has one: tier 2 (16-63)
    assert rows(100, 5, 6, 7, 20, 30, 2, 8, 16, fanout=3) == [5, 6, 7, 8]  # all of tier 1 (3-8)
    assert rows(100, 100, 5, 6, 7) == [] and rows(5, 6, 7, 8, fanout=0) == []


class SyntheticRows:
    """An index of ``n`` random 16-d reference rows (one patch each) with helpers to add any range."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.x = l2_normalize(np.random.default_rng(0).normal(size=(n, 16)))
        self.ids = [f"R{i:03d}" for i in range(n)]
        self.tmp, self.idx, self.spec = tmp_path, IndexDir(tmp_path / "index"), IndexSpec()

    def features(self, lo: int, hi: int) -> str:
        return write_table(features_table(self.ids[lo:hi], [0] * (hi - lo), "m", 64, self.x[lo:hi]),
                           self.tmp / "f" / f"{lo}.parquet")

    def images(self, lo: int, hi: int) -> pa.Table:
        return pa.table({"image_id": self.ids[lo:hi], "path": self.ids[lo:hi], "sha256": self.ids[lo:hi],
                         "width": [64] * (hi - lo), "height": [64] * (hi - lo)})

    def build(self, hi: int) -> str:
        return versions.build(self.idx, "", {}, {"m": versions.KeySource([self.features(0, hi)])}, self.images(0, hi),
                              self.spec, 128)

    def add(self, parent: str, lo: int, hi: int) -> str:
        with self.idx.publish(parent) as (name, out):
            versions.add(self.idx, parent, out, name, {"m": [self.features(lo, hi)]}, self.images(lo, hi), self.spec,
                         128)
        return name

    def key(self, version: str):
        folder = self.idx.path(version)
        return KeyIndex(folder / "keys" / "m", versions.read_manifest(folder)["keys"]["m"], set(), self.spec, 1)


def test_many_small_adds_leave_few_shards_that_answer_like_one(tmp_path):
    """Sixty adds of a few rows each: the small shards are merged tier by tier (not one shard per add),
    every row is still found as in a single exact index, and earlier versions are untouched."""
    rows = SyntheticRows(tmp_path, 400)
    first = rows.build(100)
    before = rows.key(first).search(rows.x[:100], 1)
    for lo in range(100, 400, 5):
        rows.add(rows.idx.current(), lo, lo + 5)
    last = rows.key(rows.idx.current())
    shards = versions.read_manifest(rows.idx.path(rows.idx.current()))["keys"]["m"]["shards"]
    assert last.rows == 400 and len(shards) <= 8, [s["rows"] for s in shards]  # 61 without merging
    _, found, _ = last.search(rows.x, 1)
    assert found[:, 0].tolist() == rows.ids  # each row's nearest is itself, wherever it was merged to
    again = rows.key(first).search(rows.x[:100], 1)
    assert all(np.array_equal(a, b) for a, b in zip(before, again))  # the first version still reads as it was


def test_a_writer_that_read_an_older_version_publishes_nothing(tmp_path):
    """Two index commands that each read CURRENT before the other published: the second would make
    its version from the old one and drop the first's change (a removed id live again)."""
    rows = SyntheticRows(tmp_path, 30)
    first = rows.build(20)
    removed = versions.remove(rows.idx, first, ["R000"]).version
    stale = [lambda: rows.add(first, 20, 30), lambda: versions.remove(rows.idx, first, ["R001"])]
    for write in stale:
        with pytest.raises(IndexFolderError, match=f"published {removed} after this one read {first}"):
            write()
    assert rows.idx.current() == removed and rows.idx.versions() == [first, removed] and not rows.idx.stale()
    live = versions.live_images(rows.idx.path(removed), versions.read_manifest(rows.idx.path(removed)))
    assert "R000" not in live.column("image_id").to_pylist()
    assert rows.idx.current() != rows.add(removed, 20, 30)  # from the published version: fine


def test_live_images_among_some_ids_reads_those_live_across_parts(tmp_path):
    """An add asks the id map about its folder's ids only (the map may hold millions)."""
    rows = SyntheticRows(tmp_path, 30)
    version = versions.remove(rows.idx, rows.add(rows.build(20), 20, 30), ["R021"]).version
    path = rows.idx.path(version)
    meta = versions.read_manifest(path)
    some = versions.live_images(path, meta, written=True, among=pa.array(["R003", "R021", "R025", "X"]))
    assert some.column("image_id").to_pylist() == ["R003", "R025"] and "written_ns" in some.column_names
    assert versions.live_images(path, meta, among=pa.array([], pa.string())).num_rows == 0


def test_a_compaction_publishes_on_top_of_the_takedowns_made_while_it_rebuilt(tmp_path):
    """A compaction rebuilds without the writer's lock: takedowns published after it read its version
    stay tombstones of the compacted one; after an add (other rows) it is refused."""
    rows = SyntheticRows(tmp_path, 30)
    read = versions.remove(rows.idx, rows.build(20), ["R000"]).version
    versions.remove(rows.idx, read, ["R001"])  # while the compaction of `read` rebuilt
    compacted = versions.compact(rows.idx, read, rows.spec, 128)
    path = rows.idx.path(compacted)
    meta = versions.read_manifest(path)
    assert set(versions.live_images(path, meta).column("image_id").to_pylist()) == set(rows.ids[2:20])
    assert versions.removed_table(path).column("image_id").to_pylist() == ["R001"]
    assert (meta["op"], meta["images"]["live"], meta["images"]["removed"]) == ("compact", 18, 1)
    shard_ids = {i for f in (path / "keys" / "m").glob("ref-*.parquet") for i in read_table(f)["image_id"].to_pylist()}
    assert "R000" not in shard_ids and "R001" in shard_ids  # dropped; tombstoned until the next compaction
    added = rows.add(compacted, 20, 25)
    with pytest.raises(IndexFolderError, match=f"published {added} after this one read {compacted}"):
        versions.compact(rows.idx, compacted, rows.spec, 128)
    assert rows.idx.current() == added
    assert not any((rows.idx.root / "staging").iterdir())  # its rebuild is of a version no longer current
    versions.compact(rows.idx, added, rows.spec, 128)  # run again: of the new version
    assert not any((rows.idx.root / "staging").iterdir())


def test_a_stopped_compaction_goes_on_from_its_finished_shards(tmp_path, monkeypatch, caplog):
    rows = SyntheticRows(tmp_path, 40)
    read = versions.remove(rows.idx, rows.build(40), ["R000", "R017"]).version
    build, built = versions.build_index, []

    def stopped_at_the_third(x, kind, spec):
        built.append(len(x))
        if len(built) == 3:
            raise KeyboardInterrupt
        return build(x, kind, spec)

    monkeypatch.setattr(versions, "build_index", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        versions.compact(rows.idx, read, rows.spec, 10)  # 38 live rows: 4 shards
    assert rows.idx.current() == read and len(list(rows.idx.root.glob("staging/job-compact-*/done/m/*.json"))) == 2
    built.clear()
    caplog.set_level(logging.INFO, logger=versions.__name__)
    compacted = versions.compact(rows.idx, read, rows.spec, 10)
    assert f"going on from the 2 shard(s) a stopped compaction of {read} built" in caplog.text
    assert built == [10, 8] and not any((rows.idx.root / "staging").iterdir())  # the third and fourth shards only
    monkeypatch.setattr(versions, "build_index", build)
    other = SyntheticRows(tmp_path / "other", 40)  # the same rows, compacted without a stop
    whole = versions.compact(other.idx, versions.remove(other.idx, other.build(40), ["R000", "R017"]).version,
                             other.spec, 10)
    manifest = lambda r, v: versions.read_manifest(r.idx.path(v))  # noqa: E731
    assert manifest(rows, compacted)["keys"] == manifest(other, whole)["keys"]
    assert sorted(p.name for p in (rows.idx.path(compacted) / "keys" / "m").iterdir()) == \
        sorted(p.name for p in (other.idx.path(whole) / "keys" / "m").iterdir())
    live = [n for n, i in enumerate(rows.ids) if i not in ("R000", "R017")]
    _, found, _ = rows.key(compacted).search(rows.x[live], 1)
    assert found[:, 0].tolist() == [rows.ids[n] for n in live]


def test_a_writer_starting_beside_another_never_takes_its_new_staging_folder_for_a_dead_ones(tmp_path, monkeypatch):
    """Writer B clears the staging folders of dead writers as A has made its own but not locked it yet."""
    import threading
    idx, locked = IndexDir(tmp_path / "index"), layout._locked
    made, cleared, seen = threading.Event(), threading.Event(), {}

    def slow_to_lock(f) -> bool:
        if threading.current_thread().name == "A" and Path(f.name).parent.name == "job-a":
            made.set()
            cleared.wait(timeout=1)  # B's clearing runs now, unless it waits for A to claim its folder
        return locked(f)

    def writer(name: str, wait: threading.Event | None = None) -> None:
        if wait:
            wait.wait(timeout=10)
        with idx.staging(name) as folder:
            if name == "b":
                cleared.set()
            time.sleep(0.2)
            seen[name] = folder.is_dir()

    monkeypatch.setattr(layout, "_locked", slow_to_lock)
    threads = [threading.Thread(target=writer, args=("a",), name="A"),
               threading.Thread(target=writer, args=("b", made), name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {"a": True, "b": True}


def test_an_index_compacted_to_nothing_takes_new_references(tmp_path):
    rows = SyntheticRows(tmp_path, 30)
    first = rows.build(20)
    gone = versions.remove(rows.idx, first, rows.ids[:20]).version
    empty = versions.compact(rows.idx, gone, rows.spec, 128)
    assert versions.read_manifest(rows.idx.path(empty))["images"]["live"] == 0
    added = rows.add(empty, 20, 30)
    _, found, _ = rows.key(added).search(rows.x[20:30], 1)
    assert found[:, 0].tolist() == rows.ids[20:30]


def test_prune_keeps_the_model_files_that_kept_versions_use(tmp_path):
    """Two builds with different weights: pruning the first deletes its weights, not the second's."""
    idx = IndexDir(tmp_path / "index")
    feats = write_table(features_table(["R0"], [0], "m", 64, np.ones((1, 4), np.float32) / 2), tmp_path / "f.parquet")
    images = pa.table({"image_id": ["R0"], "path": ["R0"], "sha256": ["s"], "width": [64], "height": [64]})
    blobs = []
    for i in range(2):
        (tmp_path / f"w{i}.safetensors").write_bytes(bytes([i]) * 10)
        card = ModelCard(name="m", kind="external", arch="onnx", weights=str(tmp_path / f"w{i}.safetensors"),
                         input_size=64, mean=(0, 0, 0), std=(1, 1, 1), dim=4)
        versions.build(idx, "", {"m": card}, {"m": versions.KeySource([feats])}, images, IndexSpec(), 10)
        blobs.append(idx.root / json.loads((idx.path(idx.current()) / versions.read_manifest(
            idx.path(idx.current()))["cards"]["m"]).read_text())["weights"])
    assert all(b.is_file() for b in blobs)
    assert prune(idx, 2) == ([], 0)
    dropped, freed = prune(idx, 1)
    assert dropped == ["v000001"] and idx.versions() == ["v000002"] and freed >= 10
    assert not blobs[0].exists() and blobs[1].is_file()


def test_id_paths_look_up_every_live_id_and_nothing_else():
    """The service's id -> path map, held as sorted Arrow columns: same answers as a dict, for ids
    in any order and non-ASCII ones (Arrow's byte order is Python's code point order)."""
    ids = ["R10", "R2", "é7", "R1", "Z", "a", "ß", "R100"]
    images = pa.table({"image_id": ids, "path": [f"/refs/{i}.jpg" for i in ids]})
    paths, expected = IdPaths(images), dict(zip(ids, images.column("path").to_pylist()))
    assert len(paths) == len(ids) and list(paths) == sorted(ids)
    assert all(paths[i] == expected[i] == paths.get(i) for i in ids)
    for absent in ("", "R0", "R3", "R1000", "zz", "é", "ÿ"):
        assert paths.get(absent) is None and paths.get(absent, "-") == "-"
        with pytest.raises(KeyError):
            paths[absent]
    assert IdPaths(images.slice(0, 0)).get("R1") is None


def test_an_index_naming_files_outside_itself_is_refused(tmp_path):
    """An index copied from elsewhere: a card's weights named any file (`/etc/passwd` was handed to the
    TorchScript loader) and shard names reached `unlink` when an add merged them."""
    from ensemble.index.reader import read_cards
    idx = IndexDir(tmp_path / "index")
    feats = write_table(features_table(["R0"], [0], "m", 64, np.ones((1, 4), np.float32) / 2), tmp_path / "f.parquet")
    images = pa.table({"image_id": ["R0"], "path": ["R0"], "sha256": ["s"], "width": [64], "height": [64]})
    (tmp_path / "w.safetensors").write_bytes(b"w" * 10)
    card = ModelCard(name="m", kind="external", arch="torchscript", weights=str(tmp_path / "w.safetensors"),
                     input_size=64, mean=(0, 0, 0), std=(1, 1, 1), dim=4)
    version = versions.build(idx, "", {"m": card}, {"m": versions.KeySource([feats])}, images, IndexSpec(), 10)
    folder = idx.path(version)
    assert read_cards(idx, version)["m"].weights.startswith(str(idx.root / "blobs"))
    card_file = folder / versions.read_manifest(folder)["cards"]["m"]
    for weights in ("/etc/passwd", "blobs/../../../etc/passwd", "cards/x.pt"):
        card_file.write_text(card.model_copy(update={"weights": weights}).model_dump_json())
        with pytest.raises(IndexFolderError, match=f"weights {weights} are not in the index's blobs/"):
            read_cards(idx, version)
    meta = json.loads((folder / "index.json").read_text())
    meta["keys"]["m"]["shards"][0]["name"] = "../../../../victim"
    (folder / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFolderError, match="names files outside its version folder: keys/m/../../../../victim"):
        versions.read_manifest(folder)
