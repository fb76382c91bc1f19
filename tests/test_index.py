"""The living index: a served answer equals `copydet run`'s, add/remove/compact publish versions
that answer like a rebuild, and a writer killed mid-add leaves the previous version whole."""
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet
import pytest

from core.imageio import load_rgb, sha256_file
from core.store import read_table, write_text
from ensemble.index import versions
from ensemble.index.layout import IndexDir, IndexFolderError, folder_bytes
from ensemble.index.versions import prune
from jobs import adding, indexing, matching
from jobs.commands.index import info_lines
from jobs.cli import main as copydet
from jobs.config import load_config
from jobs.layout import RunDir
from jobs.pipeline import run_pipeline
from jobs.serve.engine import Matcher
from jobs.stages.fuse import final_kind
from tests.conftest import make_tiny_dataset, synthetic_photo

# crop views on queries, a centre tile on references with the D2LV pair rule, normalisation, verification
TINY = ["models.0.name=resnet18", "models.0.scales=[64]", "models.0.batch_size=8", "patches.shard_size=5",
        "patches.reference.center_tiles=[0.7]", "search.pairs=d2lv", "search.k=5", "search.shard_size=7",
        "search.cpus_per_shard=0.1", "fuse.k=3", "fuse.calibration={resnet18@64: 1.25}", "verify.enabled=true",
        "verify.top_k=2", "verify.min_inliers=4"]
REPO = Path(__file__).resolve().parent.parent


def predictions(path) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            out.setdefault(r["query_id"], []).append((r["reference_id"], float(r["score"])))
    return {q: sorted(v, key=lambda x: -x[1]) for q, v in out.items()}


def served(matcher: Matcher, folder: Path) -> dict[str, list[tuple[str, float]]]:
    files = sorted(folder.glob("*.jpg"))
    answers = matcher.match([load_rgb(f) for f in files], [f.read_bytes() for f in files])
    return {f.stem: [(m["reference_id"], m["score"]) for m in a["matches"]] for f, a in zip(files, answers)}


def assert_same(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert set(a) == set(b) and any(a.values()), "the same matches, and some to compare"
    for q in a:
        assert [r for r, _ in a[q]] == [r for r, _ in b[q]], q
        assert all(abs(x - y) <= tol for (_, x), (_, y) in zip(a[q], b[q])), (q, a[q], b[q])


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A batch run over a tiny ISC21 set and an index built from the same config and references."""
    root = tmp_path_factory.mktemp("idx")
    data = make_tiny_dataset(root)
    cfg = load_config(None, [f"data.root={data}", f"output={root / 'run'}", *TINY])
    run_pipeline(cfg)
    index = root / "index"
    indexing.build_from_run(str(root / "run"), str(index), cfg)
    return data, cfg, root / "run", index


def shares(old: Matcher, new: Matcher) -> tuple[int, int]:
    """Image ids in the shards ``new`` took over from ``old`` (the same objects), and in ``old``;
    the train background must be taken over too."""
    a, b = old.index.keys["resnet18@64"], new.index.keys["resnet18@64"]
    assert b.train is a.train
    kept = [s for s, _, _ in b.shards if any(s is t for t, _, _ in a.shards)]
    return (len({i for s in kept for i in s.image_ids}), len({i for s, _, _ in a.shards for i in s.image_ids}))


def test_served_answer_equals_batch_predictions(built):
    data, _, run, index = built
    assert_same(served(Matcher(str(index)), data / "queries"), predictions(run / "predictions.csv"))


def test_a_folder_matched_offline_answers_as_the_batch_run_and_goes_on_where_it_stopped(built, tmp_path,
                                                                                        monkeypatch, capsys):
    data, _, run, index = built
    uploads = tmp_path / "uploads"
    shutil.copytree(data / "queries", uploads)
    (uploads / "broken.jpg").write_bytes(b"not an image")
    (uploads / "notes.txt").write_text("not an image file")
    monkeypatch.setattr(matching, "WINDOW", 3)  # 7 images: 3 windows
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # set for `copydet submit`: one replica runs here anyway
    out = tmp_path / "answers"
    argv = ["index", "match", str(index), str(uploads), "--out", str(out)]
    assert copydet(argv) == 0
    assert_same(predictions(out / "matches.csv"), predictions(run / "predictions.csv"))
    rows = list(csv.DictReader(open(out / "matches.csv")))
    assert set(rows[0]) == {"query_id", "reference_id", "score", "q_value", "verified", "inliers"}
    assert {r["verified"] for r in rows} >= {"", "1"}  # beyond verify.top_k a pair is not checked
    copied = {(r["query_id"], r["reference_id"]) for r in csv.DictReader(open(out / "copies.csv"))}
    at_zero = {(r["query_id"], r["reference_id"]) for r in csv.DictReader(open(run / "predictions.csv"))
               if float(r["score"]) >= 0}  # the run has no threshold: the service's serve.threshold, 0
    assert copied == at_zero != set() and len(at_zero) < len(rows)
    unread = pa.parquet.read_table(out / "errors.parquet").column("path").to_pylist()
    assert sorted(map(os.path.basename, unread)) == ["broken.jpg", "notes.txt"]
    assert "threshold 0.0000; 2 file(s) could not be read" in capsys.readouterr().err

    # a lost window is answered again, the rest is not; the same files come out
    before = {name: (out / name).read_bytes() for name in ("matches.csv", "copies.csv")}
    sorted((out / "parts").iterdir())[-1].unlink()
    windows = []
    monkeypatch.setattr(matching, "match_window", lambda m, files, bar: windows.append(files) or answer(m, files, bar))
    assert copydet(argv) == 0
    assert [len(w) for w in windows] == [1] and {n: (out / n).read_bytes() for n in before} == before
    # other files in the folder would shift the windows: refused, naming what changed
    (uploads / "Q000.jpg").unlink()
    assert copydet(argv) == 2 and "files: 7 -> 6" in capsys.readouterr().err


answer = matching.match_window


def test_image_files_matched_from_the_command_line_are_printed_in_order_with_the_services_answers(built, tmp_path,
                                                                                               capsys):
    """`index match INDEX FILE...`: each file's verdict, its copies (at or above the threshold; else
    its best match) as the batch run ranks them; a file that does not read is named, the others
    answered, exit 1."""
    data, _, run, index = built
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    files = [data / "queries" / "Q004.jpg", broken, data / "queries" / "Q000.jpg"]
    expected = predictions(run / "predictions.csv")
    best = [expected[f.stem][0][1] for f in files[::2]]
    assert best[0] < best[1]  # an unrelated photo and a copy: a threshold between tells them apart
    threshold = sum(best) / 2
    assert copydet(["index", "match", str(index), *map(str, files), "--set", f"serve.threshold={threshold}"]) == 1
    blocks: list[tuple[str, list[tuple[str, float]]]] = []  # (file's line, its reference lines)
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            words = line.split()
            blocks[-1][1].append((words[0], float(words[2])))
            assert words[-1] == str(data / "references" / f"{words[0]}.jpg")  # the reference's file
        else:
            blocks.append((line, []))
    assert [head.split(": ")[0] for head, _ in blocks] == list(map(str, files))
    assert blocks[1] == (f"{broken}: not read: not an image (cannot identify image file)", [])
    for (head, shown), path in zip(blocks[::2], files[::2]):
        ranked = expected[path.stem]
        copies = [(r, x) for r, x in ranked if x >= threshold]
        assert head.split(": ")[1].startswith(f"{'copy' if copies else 'not a copy'} (v000001, is-copy threshold "
                                              f"{threshold:.4f})")
        assert_same({path.stem: shown}, {path.stem: copies or ranked[:1]})
    assert [head.split(": ")[1].split(" (")[0] for head, _ in blocks[::2]] == ["not a copy", "copy"]
    assert copydet(["index", "match", str(index), str(files[0]), "--out", str(tmp_path / "o")]) == 2
    assert "--out is for a FOLDER of images" in capsys.readouterr().err
    assert copydet(["index", "match", str(index), str(files[0]), "--address", "ray://head:10001"]) == 2
    assert "--address is for a FOLDER of images" in capsys.readouterr().err
    assert copydet(["index", "match", str(index), str(tmp_path / "none.jpg")]) == 2
    assert "not files or folders: " in capsys.readouterr().err


def test_a_folder_matched_by_replicas_answers_as_one_process(built, tmp_path, monkeypatch, capsys):
    """With serve.num_replicas > 1 the windows go to Ray actors, which write the parts themselves."""
    data, _, run, index = built
    monkeypatch.setattr(matching, "WINDOW", 2)  # 6 images: 3 windows for 2 replicas
    monkeypatch.setattr(matching, "match_window", lambda *a: pytest.fail("answered in the driver"))
    out = tmp_path / "answers"
    assert copydet(["index", "match", str(index), str(data / "queries"), "--out", str(out),
                    "--set", "serve.num_replicas=2"]) == 0
    assert len(list((out / "parts").iterdir())) == 3
    assert_same(predictions(out / "matches.csv"), predictions(run / "predictions.csv"))
    # a replica that cannot start (its model's card broken) ends the command with the cause in a line
    broken = tmp_path / "broken"
    shutil.copytree(index, broken, copy_function=os.link)
    for card in (broken / "versions" / "v000001" / "cards").iterdir():
        card.unlink()  # a hard link: the built index keeps its card
        card.write_text("{not json")
    assert copydet(["index", "match", str(broken), str(data / "queries"), "--out", str(tmp_path / "again"),
                    "--set", "serve.num_replicas=2"]) == 2
    assert "a replica failed (" in capsys.readouterr().err


def test_replicas_and_adds_given_a_gpu_run_their_models_there(built, tmp_path, monkeypatch):
    """serve.num_gpus / index.num_gpus above 0 put the embedder's models on the GPU, and a replica's
    verifier's (here asked for; none seen)."""
    from jobs.stages import verify
    from patchers import embed
    asked, verifying = [], []
    monkeypatch.setattr(embed, "pick_device", lambda use_gpu: asked.append(use_gpu) or "cpu")
    monkeypatch.setattr(verify, "pick_device", lambda use_gpu: verifying.append(use_gpu) or "cpu")
    _, _, _, built_index = built
    Matcher(str(built_index))
    Matcher(str(built_index), overrides=["serve.num_gpus=1"])
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    adding.add_folder(str(index), str(new_photos(tmp_path / "new")), ["index.num_gpus=1"])
    assert asked == [False, True, True] and verifying == [False, True]


def test_a_swapped_out_matcher_is_freed_at_the_swap(built):
    """Its verification cache held the Matcher itself (a cycle): each old version, shards and
    described references, stayed until the cycle collector ran, which native memory never triggers."""
    import gc
    import weakref
    data, _, _, index = built
    old = Matcher(str(index))
    served(old, data / "queries")  # fills the described-references cache
    was = weakref.ref(old)
    gc.disable()
    try:
        new = Matcher(str(index), reuse=old)
        del old
        assert was() is None and new.version
    finally:
        gc.enable()


def test_a_reference_file_gone_leaves_its_pairs_unverified(built, tmp_path):
    """The service reads reference images to verify; one deleted after `index add` must not fail the batch."""
    data, _, _, index = built
    queries = sorted((data / "queries").glob("*.jpg"))[:2]
    first = Matcher(str(index)).match([load_rgb(q) for q in queries])[0]["matches"]
    gone = next(m["reference_id"] for m in first if m["verified"] is not None)
    path = Path(Matcher(str(index)).index.paths[gone])
    shutil.move(path, tmp_path / path.name)
    try:
        answers = Matcher(str(index)).match([load_rgb(q) for q in queries])
    finally:
        shutil.move(tmp_path / path.name, path)
    again = {m["reference_id"]: m for m in answers[0]["matches"]}
    assert again[gone]["verified"] is None and again[gone]["inliers"] is None
    assert sum(m["verified"] is not None for m in again.values()) == sum(m["verified"] is not None for m in first) - 1
    assert answers[1]["matches"]


def test_add_remove_compact(built, tmp_path, monkeypatch, caplog, capsys):
    data, cfg, _, built_index = built
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    extra = tmp_path / "extra"
    extra.mkdir()
    synthetic_photo(900).save(extra / "R900.jpg")
    synthetic_photo(901).save(extra / "R901.jpg")
    shutil.copy(data / "references" / "R001.jpg", extra / "R001.jpg")  # already in: skipped, not duplicated
    (extra / "R902.jpg").write_bytes(b"")
    synthetic_photo(902).save(extra / "R902.png")
    with pytest.raises(ValueError, match=r"'R902' \(.*R902.jpg and .*R902.png\)"):  # which one is R902?
        adding.add_folder(str(index), str(extra))
    (extra / "R902.png").unlink()
    (extra / "R902.jpg").rename(extra / "bad:name.jpg")  # empty
    (extra / "broken.jpg").write_bytes(b"not a jpeg")
    (extra / "notes.txt").write_text("not an image file extension")
    monkeypatch.chdir(tmp_path)  # a folder given relative is recorded absolute: the service opens the files
    caplog.set_level(logging.INFO)
    name, added, errors = adding.add_folder(str(index), "extra")
    assert (name, added) == ("v000002", 2) and len(errors) == 3
    recorded = pa.parquet.read_table(IndexDir(index).path(name) / "errors.parquet").to_pylist()
    assert sorted(Path(r["path"]).name for r in recorded) == ["bad:name.jpg", "broken.jpg", "notes.txt"]
    assert "1 image(s) of extra are already in the index; skipped: R001" in caplog.text
    assert "4 new images: 2 embedded, 2 unreadable" in caplog.text  # notes.txt is not counted as an image
    assert adding.add_folder(str(index), str(extra))[:2] == (name, 0)  # a retry: nothing new, nothing published
    assert "already in the index; skipped: R001, R900, R901" in caplog.text
    synthetic_photo(777).save(extra / "R001.jpg")  # another picture under an indexed id: kept, and said so
    capsys.readouterr()
    assert copydet(["index", "add", str(index), str(extra)]) == 0 and IndexDir(index).current() == name
    err = capsys.readouterr().err
    assert "1 of them are other pictures than the indexed ones, which are kept: R001;" in err, err
    assert "that reads is in v000002 already; the 3 file(s) above could not be read" in err
    shutil.copy(data / "references" / "R001.jpg", extra / "R001.jpg")
    # the added image is found first by a copy of itself; R001 is there once
    m = Matcher(str(index))
    copy = synthetic_photo(900).crop((5, 5, 90, 70))
    assert m.match([copy])[0]["matches"][0]["reference_id"] == "R900"
    assert list(m.index.paths).count("R001") == 1 and len(m.index.paths) == 10
    assert m.index.paths["R900"] == str(extra / "R900.jpg")
    # re-adding the folder hashes only the files that may have changed; one replaced in place is named
    hashed = []
    monkeypatch.setattr(adding, "sha256_file", lambda p: hashed.append(Path(p).name) or sha256_file(p))
    synthetic_photo(778).save(extra / "R901.jpg")
    capsys.readouterr()
    assert copydet(["index", "add", str(index), str(extra)]) == 0 and IndexDir(index).current() == name
    assert sorted(hashed) == ["R001.jpg", "R901.jpg"]  # R001: another path than the indexed one
    assert "1 of them are other pictures than the indexed ones, which are kept: R901;" in capsys.readouterr().err
    synthetic_photo(901).save(extra / "R901.jpg")
    # a service that served v1 takes over the shards and background the add kept, and answers the same
    first = Matcher(str(index), "v000001")
    swapped = Matcher(str(index), reuse=first)
    assert_same(served(swapped, data / "queries"), served(m, data / "queries"))
    assert swapped.embedder is first.embedder and shares(first, swapped) == (8, 8)  # 8 ids of v1, 2 more added

    # a rebuild over the same references answers the same
    both = tmp_path / "refs"
    shutil.copytree(data / "references", both)
    for f in ("R900.jpg", "R901.jpg"):
        shutil.copy(extra / f, both / f)
    rebuilt = tmp_path / "rebuilt"
    indexing.build_from_folders(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"root": None, "references": str(both), "train": str(data / "train")})}), str(rebuilt))
    assert_same(served(m, data / "queries"), served(Matcher(str(rebuilt)), data / "queries"))

    done = indexing.remove_ids(str(index), ["R900", "R007", "nope"])
    assert (done.version, done.removed, done.unknown) == ("v000003", ["R007", "R900"], ["nope"])
    assert not (IndexDir(index).path("v000003") / "errors.parquet").exists()  # the add's own record
    assert copydet(["index", "remove", str(index), "R900"]) == 0  # a retry of a remove that published
    assert copydet(["index", "remove", str(index), "nope"]) == 1 and IndexDir(index).current() == "v000003"
    m = Matcher(str(index), reuse=swapped)  # every shard shared, the tombstones new
    assert shares(swapped, m) == (10, 10)
    for answer in m.match([copy, load_rgb(data / "queries" / "Q003.jpg")]):  # Q003 is a copy of R007
        assert {"R900", "R007"}.isdisjoint(x["reference_id"] for x in answer["matches"])
    with pytest.raises(ValueError, match="^R900: removed since the last compaction"):
        adding.add_folder(str(index), str(extra))  # R900 was removed: re-adding waits for compaction
    assert indexing.compact(str(index)) == "v000004"
    compacted = Matcher(str(index))
    assert_same(served(compacted, data / "queries"), served(m, data / "queries"))
    assert sum(s["rows"] for s in compacted.index.meta["keys"]["resnet18@64"]["shards"]) == 2 * 8
    text = "\n".join(info_lines(str(index)))
    assert "* v000004" in text and "8 live, 0 removed" in text and "v000003  remove" in text
    assert folder_bytes(index / "versions", distinct=True) < folder_bytes(index / "versions")
    total = (folder_bytes(index / "blobs") + folder_bytes(index / "versions", distinct=True)) / 2**20
    assert f"on disk: {total:.1f} MiB in all: model files" in text  # one total, its two parts named
    assert IndexDir(index).versions() == ["v000001", "v000002", "v000003", "v000004"]

    # prune: the published version alone is kept, the rows compacted away are freed, it answers the same
    idx = IndexDir(index)
    (idx.root / "blobs").mkdir(exist_ok=True)
    (idx.root / "blobs" / "unused.safetensors").write_bytes(b"0" * 100)
    shared = idx.path("v000004") / "config.yaml"  # a hard link shared with every earlier version
    assert shared.stat().st_nlink == 4

    def disk() -> int:  # bytes of distinct files (inodes)
        return sum({f.stat().st_ino: f.stat().st_size for f in idx.versions_dir.rglob("*") if f.is_file()}.values())
    before = disk()
    with pytest.raises(ValueError, match="keep"):
        prune(idx, 0)
    capsys.readouterr()
    assert copydet(["index", "prune", str(index)]) == 0  # keeps 2 by default
    assert "deleted 2 version(s) (v000001 to v000002)," in capsys.readouterr().err
    assert copydet(["index", "prune", str(index), "--keep", "1"]) == 0
    assert "deleted 1 version(s) (v000003)," in capsys.readouterr().err
    assert idx.versions() == ["v000004"] and shared.stat().st_nlink == 1 and not idx.stale()
    assert not (idx.root / "blobs" / "unused.safetensors").exists()
    assert disk() < before  # the removed R007 and R900's rows lived only in the old shards
    assert_same(served(Matcher(str(index)), data / "queries"), served(compacted, data / "queries"))
    # a takedown list with a typo: the known id goes, the exit status says the list was not all done
    assert copydet(["index", "remove", str(index), "R001", "R00l"]) == 1
    assert idx.current() == "v000005" and indexing.remove_ids(str(index), ["R001"]).already == ["R001"]
    ids = tmp_path / "takedown.csv"  # as a spreadsheet exports it: a BOM, CRLF line ends, a blank line
    ids.write_bytes("\ufeffR002\r\n\r\nR003\r\n".encode())
    assert copydet(["index", "remove", str(index), "--ids-file", str(ids)]) == 0
    assert indexing.remove_ids(str(index), ["R002", "R003"]).already == ["R002", "R003"]


def test_each_served_match_has_the_q_value_of_the_run_the_index_was_built_from(built, tmp_path):
    """With the threshold a run estimated, the index keeps its score -> q-value curve (threshold.json's
    q_curve) through removes and compaction; each match gets q_at(curve, score); an index without one, null."""
    data, cfg, run_dir, built_index = built
    queries = [load_rgb(f) for f in sorted((data / "queries").glob("*.jpg"))]
    assert Matcher(str(built_index)).match(queries[:1])[0]["matches"][0]["q_value"] is None
    run, index = tmp_path / "run", tmp_path / "index"
    shutil.copytree(run_dir, run)
    scores = sorted(s for v in predictions(run / "predictions.csv").values() for _, s in v)
    curve = [[scores[len(scores) // 2], 0.05], [scores[0] - 1, 0.5]]
    auto = cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"threshold": "auto"}), "output": str(run)})
    write_text(str(run / "threshold.json"), json.dumps({"threshold": curve[0][0], "target": 0.95,
                                                        "scores": final_kind(auto), "q_curve": curve}))
    indexing.build_from_run(str(run), str(index), auto)
    for version in (None, indexing.remove_ids(str(index), ["R001"]).version, indexing.compact(str(index))):
        matches = [m for a in Matcher(str(index), version).match(queries) for m in a["matches"]]
        assert {m["q_value"] for m in matches} == {0.05, 0.5}, version
        assert all(m["q_value"] == (0.05 if m["score"] >= curve[0][0] else 0.5) for m in matches)
    # `index info` says which threshold answers and whether it is calibrated
    assert (f"is-copy threshold: {curve[0][0]:.4f} (estimated by the run it was built from; q-values from that "
            "run's curve)") in info_lines(str(index))
    assert "is-copy threshold: 0.0000 (serve.threshold, not calibrated: no run's estimate (index build --from-run " \
           "gives one); no q-values)" in info_lines(str(built_index))
    numbered = tmp_path / "numbered"  # a config's own number: used, but no curve to give q-values
    shutil.copytree(built_index, numbered)
    config = numbered / "versions" / "v000001" / "config.yaml"
    config.write_text(config.read_text().replace("  threshold: null\n", "  threshold: 0.3\n", 1))
    assert "is-copy threshold: 0.3000 (the config's fuse.threshold; no q-values)" in info_lines(str(numbered))


def test_an_index_with_no_live_reference_answers_no_match(built, tmp_path):
    data, _, _, built_index = built
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    live = sorted(Matcher(str(index)).index.paths)
    indexing.remove_ids(str(index), live)
    for version in (None, indexing.compact(str(index))):  # tombstoned, then compacted to no rows
        answer = Matcher(str(index), version).match([load_rgb(data / "queries" / "Q003.jpg")])[0]
        assert (answer["matches"], answer["is_copy"]) == ([], False)
        assert matching.answer_lines("q.jpg", answer) == [f"q.jpg: not a copy ({answer['version']}, is-copy "
                                                          "threshold 0.0000); the index has no live reference"]


def test_killed_add_leaves_previous_version(built, tmp_path):
    data, _, _, built_index = built
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    before = served(Matcher(str(index)), data / "queries")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(60):
        synthetic_photo(2000 + i, (320, 240)).save(many / f"N{i:03d}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # two images per step, so the kill lands while the new references are being embedded
    cmd = [sys.executable, "-m", "jobs.cli", "index", "add", str(index), str(many), "--set", "index.chunk_images=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    staged = None
    while time.time() < deadline and proc.poll() is None:
        staged = next(index.glob("staging/job-*/*/part-*.parquet"), None)
        if staged:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(60) == -signal.SIGKILL, f"add finished before it could be killed: {proc.stderr.read()[-500:]}"
    assert staged is not None
    idx = IndexDir(index)
    assert idx.current() == "v000001" and idx.versions() == ["v000001"] and staged.exists()
    assert any(line.startswith("adds or compactions at work, or stopped") for line in info_lines(str(index)))
    assert served(Matcher(str(index)), data / "queries") == before  # the previous version loads and answers
    # the next add clears the leftovers and publishes normally
    shutil.rmtree(many)
    many.mkdir()
    synthetic_photo(3000).save(many / "N999.jpg")
    assert adding.add_folder(str(index), str(many))[:2] == ("v000002", 1)
    assert not idx.stale() and not any((index / "staging").iterdir())


def test_an_add_stopped_half_way_goes_on_from_its_staged_chunks(built, tmp_path, monkeypatch, caplog):
    data, _, _, built_index = built
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    new = new_photos(tmp_path / "new")
    derive, calls = adding.derive_keys, []

    def stopped_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return derive(*args)

    monkeypatch.setattr(adding, "derive_keys", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        adding.add_folder(str(index), str(new), ["index.chunk_images=2"])
    assert len(list(index.glob("staging/job-*/images/part-*.parquet"))) == 2 and IndexDir(index).current() == "v000001"
    calls.clear()
    caplog.set_level(logging.INFO, logger=adding.__name__)
    version, added, errors = adding.add_folder(str(index), str(new), ["index.chunk_images=2"])
    assert (version, added, len(calls)) == ("v000002", 6, 1)  # the third chunk only (the fourth does not decode)
    assert "7 new images: 6 embedded, 1 unreadable (4 read back from a stopped run's chunks)" in caplog.text
    assert len(errors) == 1 and "broken.jpg" in errors[0] and not any((index / "staging").iterdir())
    assert {f"N{i:03d}" for i in range(6)} <= live_ids(index)
    fresh = tmp_path / "fresh"
    shutil.copytree(built_index, fresh)
    monkeypatch.setattr(adding, "derive_keys", derive)
    adding.add_folder(str(fresh), str(new), ["index.chunk_images=2"])
    ask = asked(tmp_path / "ask", data / "queries", new)  # answered as after an add that was not stopped
    assert served(Matcher(str(index)), ask) == served(Matcher(str(fresh)), ask)


def new_photos(folder: Path) -> Path:
    """Six new references and a file that does not decode (sorted last)."""
    folder.mkdir()
    for i in range(6):
        synthetic_photo(5000 + i).save(folder / f"N{i:03d}.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def asked(folder: Path, queries: Path, new: Path) -> Path:
    """The queries and the new references, to ask an index that holds them."""
    shutil.copytree(queries, folder)
    for image in new.glob("N*.jpg"):
        shutil.copy(image, folder)
    return folder


def test_an_add_on_workers_embeds_in_ray_actors_as_one_process(built, tmp_path, monkeypatch, capsys):
    """With index.num_workers > 1 the chunks go to Ray actors, which write them into the staging folder."""
    data, _, _, built_index = built
    new = new_photos(tmp_path / "new")
    index, alone = tmp_path / "index", tmp_path / "alone"
    for folder in (index, alone):
        shutil.copytree(built_index, folder)
    assert adding.add_folder(str(alone), str(new), ["index.chunk_images=2"])[:2] == ("v000002", 6)
    monkeypatch.setattr(adding, "derive_keys", lambda *a: pytest.fail("embedded in the driver"))
    assert copydet(["index", "add", str(index), str(new), "--set", "index.chunk_images=2",
                    "--set", "index.num_workers=2", "--set", "index.num_cpus=0.5"]) == 0
    assert "broken.jpg" in capsys.readouterr().err and not any((index / "staging").iterdir())
    assert live_ids(index) == live_ids(alone)
    ask = asked(tmp_path / "ask", data / "queries", new)
    assert_same(served(Matcher(str(index)), ask), served(Matcher(str(alone)), ask))


def test_chunks_finishing_out_of_order_are_published_in_the_folders_order(built, tmp_path, monkeypatch):
    """Workers finish chunks in any order (the bar counts each as it finishes); the new id-map rows
    and features still follow the folder's order, as one process writes them."""
    _, _, _, built_index = built
    index, alone = tmp_path / "index", tmp_path / "alone"
    for folder in (index, alone):
        shutil.copytree(built_index, folder)
    new = new_photos(tmp_path / "new")
    adding.add_folder(str(alone), str(new), ["index.chunk_images=2"])
    on_workers = adding.on_workers
    monkeypatch.setattr(adding, "on_workers", lambda *a, **k: reversed(list(on_workers(*a, **k))))
    version, added, _ = adding.add_folder(str(index), str(new), ["index.chunk_images=2"])

    def new_rows(root: Path, key: str | None = None) -> list[str]:
        path = IndexDir(root).path(version)
        meta = versions.read_manifest(path)
        tables = [read_table(path / "keys" / key / f"{s['name']}.parquet", ["image_id"])
                  for s in meta["keys"][key]["shards"]] if key else [versions.live_images(path, meta)]
        return [i for t in tables for i in t.column("image_id").to_pylist() if i.startswith("N")]
    assert added == 6 and new_rows(index) == [f"N{i:03d}" for i in range(6)] == new_rows(alone)
    key = next(iter(versions.read_manifest(IndexDir(index).path(version))["keys"]))
    assert new_rows(index, key) == new_rows(alone, key)


def live_ids(index: Path) -> set[str]:
    idx = IndexDir(index)
    path = idx.path(idx.require_current())
    return set(versions.live_images(path, versions.read_manifest(path)).column("image_id").to_pylist())


def test_a_takedown_publishes_while_an_add_embeds_and_the_add_lands_on_it(built, tmp_path, monkeypatch):
    """An add embeds without the writer's lock: a takedown meanwhile is not refused, and the add then
    publishes on top of it; on top of another add (which could hold the same ids) it is refused."""
    _, _, _, built_index = built
    index = tmp_path / "index"
    shutil.copytree(built_index, index)
    new, other, more = tmp_path / "new", tmp_path / "other", tmp_path / "more"
    for i, folder in enumerate((new, other, more)):
        folder.mkdir()
        synthetic_photo(4000 + i).save(folder / f"N{i:03d}.jpg")
    embed, meanwhile = adding.embed_new, []
    monkeypatch.setattr(adding, "embed_new", lambda *a: (embed(*a), meanwhile and meanwhile.pop()())[0])
    meanwhile.append(lambda: indexing.remove_ids(str(index), ["R001"]))
    assert adding.add_folder(str(index), str(new))[:2] == ("v000003", 1)
    assert "N000" in live_ids(index) and "R001" not in live_ids(index)
    meanwhile.append(lambda: adding.add_folder(str(index), str(other)))
    with pytest.raises(IndexFolderError, match="published v000004 after this one read v000003"):
        adding.add_folder(str(index), str(more))
    assert "N001" in live_ids(index) and "N002" not in live_ids(index)
    assert len(list((index / "staging").iterdir())) == 1  # the refused add's chunks, which its re-run takes
    assert adding.add_folder(str(index), str(more))[:2] == ("v000005", 1) and not any((index / "staging").iterdir())


def test_a_run_is_published_whole_and_as_it_was_made(built, tmp_path, capsys):
    """`index build --from-run` refuses a run missing a reference feature file (the index would
    never answer with those references) and settings that change the answers (the run's scores
    and threshold estimate hold for its own config only); nothing is published."""
    _, _, run, _ = built
    index = tmp_path / "index"
    shutil.copytree(run, tmp_path / "run")
    assert copydet(["index", "build", "--from-run", str(tmp_path / "run"), "--out", str(index),
                    "--set", "search.normalize.beta=3"]) == 2
    assert "['search.normalize.beta=3']: an index built from" in capsys.readouterr().err
    assert copydet(["index", "build", "configs/smoke.yaml", "--from-run", str(tmp_path / "run"),
                    "--out", str(index)]) == 2
    assert "give no CONFIG" in capsys.readouterr().err
    features = tmp_path / "run" / "features" / "resnet18@64"
    lost = sorted(features.glob("reference-*.parquet"))[-1]
    lost.unlink()
    assert copydet(["index", "build", "--from-run", str(tmp_path / "run"), "--out", str(index)]) == 2
    err = capsys.readouterr().err
    assert "index build: " in err and "is incomplete: 1 of" in err and lost.name in err
    assert not (index / "CURRENT").exists()
    # serve.* settings do not change the answers
    shutil.copytree(run, tmp_path / "whole")
    assert copydet(["index", "build", "--from-run", str(tmp_path / "whole"), "--out", str(index),
                    "--set", "serve.threshold=0.5"]) == 0 and (index / "CURRENT").exists()


def test_a_build_left_by_a_stopped_build_of_other_images_names_its_folder(ray_local, tmp_path):
    from jobs.pipeline import run_stages
    data = make_tiny_dataset(tmp_path)
    cfg = load_config(None, [f"data.root={data}", *TINY])
    other = tmp_path / "other"
    shutil.copytree(data / "references", other)
    synthetic_photo(950).save(other / "R950.jpg")
    index = tmp_path / "index"
    refs = cfg.data.model_copy(update={"root": None, "references": str(other)})
    run_stages(cfg.model_copy(update={"data": refs, "output": str(index / ".staging")}), ["manifest"])  # then stopped
    with pytest.raises(ValueError, match=r"(?s)other settings.*index/\.staging holds a build .* delete it to build this one"):
        indexing.build_from_folders(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"root": None, "references": str(data / "references")})}), str(index))


def test_writer_lock_and_missing_index(tmp_path):
    idx = IndexDir(tmp_path / "i")
    with idx.lock():
        with pytest.raises(IndexFolderError, match="another"):
            with idx.lock():
                pass
    with pytest.raises(IndexFolderError, match="not an index"):
        Matcher(str(tmp_path / "nothing"))


def test_an_option_of_another_action_is_refused_not_ignored(tmp_path, capsys):
    argv = ["index", "info", str(tmp_path), "a", "b", "--keep", "7", "--references", "refs"]
    assert copydet(argv) == 2
    assert "index info: --references is for build; --keep is for prune; a b is for add and remove" in \
        capsys.readouterr().err
    assert copydet(["index", "prune", str(tmp_path), "--ids-file", "ids.txt"]) == 2
    assert "index prune: --ids-file is for remove" in capsys.readouterr().err
    assert copydet(["index", "info", str(tmp_path), "--keep", "2"]) == 2  # its default, given
    assert "index info: --keep is for prune" in capsys.readouterr().err


def test_an_index_from_a_run_serves_the_threshold_the_run_estimated(tmp_path, caplog):
    """fuse.threshold auto is estimated per batch run; the index keeps that run's number, when it was
    estimated on the scores the service gives (verified here), so is_copy is calibrated when served;
    the warning says why it was not."""
    run = RunDir(str(tmp_path))
    cfg = load_config(None, ["fuse.threshold=auto", "verify.enabled=true"])
    assert indexing.served_threshold(cfg, run).fuse.threshold == "auto"  # no estimate: serve.threshold
    assert "an index built from folders has no queries" in caplog.text
    record = {"threshold": 0.1234, "target": 0.9, "scores": "fused"}
    write_text(run.threshold, json.dumps(record))
    assert indexing.served_threshold(cfg, run).fuse.threshold == "auto"  # not on the verified scores
    assert "its estimate is on fused scores" in caplog.text
    write_text(run.threshold, json.dumps({**record, "threshold": None, "scores": "verified"}))
    assert indexing.served_threshold(cfg, run).fuse.threshold == "auto"
    assert "no score of its predictions reaches an estimated precision of 0.9" in caplog.text
    write_text(run.threshold, json.dumps({**record, "scores": "verified"}))
    served = indexing.served_threshold(cfg, run)
    assert served.fuse.threshold == 0.1234 and served.copy_threshold() == 0.1234
    number = load_config(None, ["fuse.threshold=0.5"])
    assert indexing.served_threshold(number, run) is number
