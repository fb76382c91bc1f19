"""A run's inputs (jobs.inputs) and its upstream checks (jobs.completeness), without Ray or models:
folders and counts, one file per id, the pinned file list, ground truth per split, missing shards."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow as pa
import pytest

from core.imageio import sha256_file
from core.store import join, read_table, version, write_table
from jobs.completeness import IncompleteUpstream, require_complete
from jobs.config import DataConfig
from jobs.inputs import (
    InputError,
    check_ground_truth,
    images,
    input_changes,
    pin_inputs,
    scan_inputs,
    split_folders,
)
from jobs.layout import RunDir
from tests.conftest import synthetic_photo


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    """queries Q1 (.jpg), Q2 (.JPEG), sub/Q3 (.jfif) and a note; references R1, R2 and a file named Q1."""
    root = tmp_path / "data"
    for name in ("Q1.jpg", "Q2.JPEG", "sub/Q3.jfif", "notes.txt"):
        touch(root / "queries" / name)
    for name in ("R1.png", "R2.jpg", "Q1.jpg"):
        touch(root / "references" / name)
    return root


def gt(path: Path, pairs: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("query_id", "reference_id"), *pairs])
    return str(path)


def test_every_file_is_an_image_or_a_rejected_row(data):
    table = scan_inputs(split_folders(DataConfig(root=str(data))))
    assert {s: [i for i, _ in f] for s, f in images(table).items()} == {
        "query": ["Q1", "Q2", "sub/Q3"], "reference": ["Q1", "R1", "R2"]}
    errors = [e for e in table.column("error").to_pylist() if e]
    assert len(errors) == 1 and "notes.txt" in errors[0] and "extension" in errors[0]


def test_one_id_given_by_two_files_is_refused_naming_both(data):
    touch(data / "queries" / "Q1.png")
    with pytest.raises(InputError, match=r"data\.queries: 1 image id\(s\) .*'Q1' \(.*Q1\.jpg and .*Q1\.png\)"):
        scan_inputs(split_folders(DataConfig(root=str(data))))


@pytest.mark.parametrize("field, value, message", [
    ("root", "nope", r"data\.root: .*nope is not a folder"),
    ("queries", "nope", r"data\.queries: .*nope is not a folder"),
    ("ground_truth", "nope.csv", r"data\.ground_truth: .*nope\.csv is not a file"),
])
def test_configured_paths_that_do_not_exist_are_named(data, field, value, message):
    cfg = DataConfig(**{"root": str(data), field: str(data.parent / value)})
    with pytest.raises(InputError, match=message):
        split_folders(cfg)


def test_a_required_split_without_a_folder_or_images_is_named(data):
    for f in (data / "references").iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"data\.references: .*references has no image files"):
        scan_inputs(split_folders(DataConfig(root=str(data))))
    (data / "references").rmdir()
    assert "reference" not in split_folders(DataConfig(root=str(data)))  # not needed: allowed
    with pytest.raises(InputError, match=r"data\.references: no references folder \(.*references does not exist\)"):
        split_folders(DataConfig(root=str(data)), ("query", "reference"))


def later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_the_file_list_is_pinned_and_a_change_is_refused_naming_the_files(data, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    folders = split_folders(DataConfig(root=str(data)))
    extra = touch(data / "queries" / "Q9.jpg")
    pin_inputs(run, folders)  # a run refused by its early checks: nothing made from its list yet
    extra.unlink()
    first = pin_inputs(run, folders)  # so the fixed folder is pinned in its place
    assert read_table(run.inputs).equals(first) and str(extra) not in first.column("path").to_pylist()
    hashed = [{"path": p, "sha256": sha256_file(p)} for p in first.column("path").to_pylist()]
    write_table(pa.Table.from_pylist(hashed), join(run.manifest, "all.parquet"))  # the manifest's first shard
    assert pin_inputs(run, folders).equals(first)  # unchanged: accepted
    touch(data / "queries" / "Q4.jpg")
    (data / "references" / "R2.jpg").unlink()
    q1 = touch(data / "queries" / "Q1.jpg", b"y")  # same size, other bytes
    later(q1)
    assert input_changes(first, scan_inputs(folders)) == [
        f"1 added ({data / 'queries' / 'Q4.jpg'})", f"1 removed ({data / 'references' / 'R2.jpg'})",
        f"1 changed ({q1})"]
    with pytest.raises(InputError, match=r"input images changed .*1 added .*Q4\.jpg.*new folder \(--out; `copydet run "
                                          r"--reuse "):
        pin_inputs(run, folders)


def test_new_mtimes_are_accepted_when_the_bytes_hash_to_the_manifest(data, tmp_path):
    """A copied or restored dataset (same files, new mtimes) keeps its run folder; an edit that
    keeps the size does not, nor does a file the manifest has not hashed."""
    run = RunDir(str(tmp_path / "run"))
    folders = split_folders(DataConfig(root=str(data)))
    first = pin_inputs(run, folders)
    files = images(first)
    hashed = [{"path": p, "sha256": sha256_file(p)} for split in ("query", "reference") for _, p in files[split]]
    write_table(pa.Table.from_pylist(hashed), join(run.manifest, "all.parquet"))
    for _, path in files["query"] + files["reference"]:
        later(Path(path))
    again = pin_inputs(run, folders)
    assert again.column("mtime_ns") != first.column("mtime_ns")
    assert read_table(run.inputs).equals(again)  # pinned again: the next run reads no bytes
    r1 = touch(data / "references" / "R1.png", b"y")  # same size, other bytes
    with pytest.raises(InputError, match=r"1 changed \(.*R1\.png\)"):
        pin_inputs(run, folders)
    r1.write_bytes(b"x")
    assert pin_inputs(run, folders).equals(read_table(run.inputs))
    write_table(pa.Table.from_pylist(hashed[:1]), join(run.manifest, "all.parquet"))  # R1 not hashed yet
    later(r1)
    with pytest.raises(InputError, match=r"1 changed \(.*R1\.png\)"):
        pin_inputs(run, folders)


def test_a_file_the_manifest_could_not_decode_is_the_same_file_while_it_still_does_not(data, tmp_path):
    """A restored dataset with a broken photo keeps its run folder; a file recorded as broken that
    decodes now (same size, new mtime) is another file: the run's shards miss it."""
    run = RunDir(str(tmp_path / "run"))
    folders = split_folders(DataConfig(root=str(data)))
    synthetic_photo(1).save(data / "references" / "R1.png")
    first = pin_inputs(run, folders)
    broken = [str(data / "queries" / "Q1.jpg"), str(data / "references" / "R1.png")]
    decoded = [{"path": p, "sha256": sha256_file(p)} for p in first.column("path").to_pylist() if p not in broken]
    write_table(pa.Table.from_pylist(decoded), join(run.manifest, "all.parquet"))
    write_table(pa.Table.from_pylist([{"path": p, "error": f"{p}: not an image"} for p in broken]),
                join(run.errors, "all.parquet"))  # R1.png as if its bytes were broken then
    later(Path(broken[0]))
    assert pin_inputs(run, folders).column("mtime_ns") != first.column("mtime_ns")  # still broken: accepted
    later(Path(broken[1]))
    with pytest.raises(InputError, match=r"1 changed \(.*R1\.png\)"):  # decodes now
        pin_inputs(run, folders)


def test_ground_truth_ids_must_be_images_of_their_own_split(data, tmp_path):
    inputs = scan_inputs(split_folders(DataConfig(root=str(data))))
    assert check_ground_truth(gt(tmp_path / "ok.csv", [("Q1", "R1"), ("sub/Q3", "Q1")]), inputs) == [
        ("Q1", "R1"), ("sub/Q3", "Q1")]
    # R1 is a reference, not a query; Q2 is a query, not a reference
    with pytest.raises(InputError, match=r"2 id\(s\) .*query 'R1', reference 'Q2'"):
        check_ground_truth(gt(tmp_path / "bad.csv", [("R1", "R2"), ("Q1", "Q2")]), inputs)


def test_with_a_limit_only_pairs_of_the_images_taken_are_scored(data, tmp_path):
    """data.limit 2 takes queries Q1, Q2 and references Q1, R1: a copy of R2 or of sub/Q3 cannot be
    found, so it is no miss; an id that is no image at all is still refused."""
    inputs = scan_inputs(split_folders(DataConfig(root=str(data))))
    path = gt(tmp_path / "gt.csv", [("Q1", "R1"), ("Q2", "R2"), ("sub/Q3", "Q1"), ("Q2", "Q1")])
    assert check_ground_truth(path, inputs, limit=2) == [("Q1", "R1"), ("Q2", "Q1")]
    assert len(check_ground_truth(path, inputs)) == 4
    with pytest.raises(InputError, match="reference 'R9'"):
        check_ground_truth(gt(tmp_path / "bad.csv", [("Q1", "R9")]), inputs, limit=2)


def test_a_missing_upstream_file_is_named_with_its_producer(tmp_path):
    folder = tmp_path / "features"
    touch(folder / "query-00000-0000.parquet")
    require_complete(str(folder), ["query-00000-0000.parquet"], "search", "extract")
    with pytest.raises(IncompleteUpstream, match=r"search: .*features is incomplete: 1 of 2 expected file\(s\) "
                                                 r"missing \(query-00001-0000\.parquet\); run `copydet extract`"):
        require_complete(str(folder), ["query-00000-0000.parquet", "query-00001-0000.parquet"], "search", "extract")
    with pytest.raises(IncompleteUpstream, match="nothing to read"):
        require_complete(str(folder), [], "search", "extract")


def test_a_patch_shard_is_read_once_for_every_chunk_plan_until_it_is_rewritten(tmp_path, monkeypatch):
    from jobs import completeness
    shard = str(tmp_path / "query-00000.parquet")
    write_table(pa.table({"image_id": ["a", "a", "b", "c", "c", "c"]}), shard)
    reads, read = [], completeness.read_table
    monkeypatch.setattr(completeness, "read_table", lambda *a, **k: reads.append(a[0]) or read(*a, **k))
    plans = [completeness.shard_chunks(shard, version(shard), 3) for _ in range(3)]
    assert plans == [((0, 3), (3, 6))] * 3 and reads == [shard]
    assert completeness.shard_chunks(shard, version(shard), 2) == ((0, 2), (2, 3), (3, 6))  # another size: read
    write_table(pa.table({"image_id": ["a", "b", "c"]}), shard)  # rewritten: read again
    assert completeness.shard_chunks(shard, version(shard), 3) == ((0, 3),) and len(reads) == 3


def test_a_list_pinned_from_a_relative_folder_is_the_same_list_from_its_absolute_path(data, tmp_path, monkeypatch):
    """Runs pin absolute paths now (config.yaml saves absolute folders); a list pinned relative to
    the working folder before is the same files from there."""
    run = RunDir(str(tmp_path / "run"))
    monkeypatch.chdir(data.parent)
    relative = split_folders(DataConfig(root=data.name))
    first = scan_inputs(relative)
    assert all(os.path.isabs(p) for p in first.column("path").to_pylist())
    write_table(first.set_column(first.schema.get_field_index("path"), "path",
                                 pa.array([os.path.relpath(p) for p in first.column("path").to_pylist()])),
                run.inputs)  # as a run pinned it before
    assert input_changes(read_table(run.inputs), scan_inputs(split_folders(DataConfig(root=str(data))))) == []
    pin_inputs(run, split_folders(DataConfig(root=str(data))))  # accepted
