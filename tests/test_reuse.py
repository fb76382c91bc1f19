"""``copydet run --reuse RUN``: new queries start from RUN's reference and train shards."""
import csv
import json
import logging
import os
import shutil

import pytest

from jobs import environment
from jobs.cli import main
from jobs.config import load_config
from jobs.inputs import InputError
from jobs.layout import RunDir, shard_names
from jobs.pipeline import run_pipeline, run_stages
from tests.test_pipeline import TINY

PCA = ["reduce.dim=4"]


def same_file(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.samefile(a, b)


def folders(run: RunDir, keys: list[str]) -> list[str]:
    return [run.manifest, run.errors, run.patches, *map(run.features, keys)]


def lent_shards(a: RunDir, b: RunDir, keys: list[str]) -> list[list[str]]:
    """Per folder of :func:`folders`, the shards of ``a`` that ``b`` holds as the same file (hard links)."""
    return [[n for n in shard_names(x) if same_file(os.path.join(x, n), os.path.join(y, n))]
            for x, y in zip(folders(a, keys), folders(b, keys))]


def shards_of(run: RunDir, keys: list[str], *splits: str) -> list[list[str]]:
    return [[n for n in shard_names(x) if n.startswith(tuple(f"{s}-" for s in splits))] for x in folders(run, keys)]


def predictions(run: RunDir) -> list[dict]:
    with open(run.predictions) as f:
        return list(csv.DictReader(f))


def test_new_queries_reuse_the_reference_and_train_shards_of_a_run(ray_local, tiny_dataset, tmp_path, caplog,
                                                                    capsys):
    caplog.set_level(logging.INFO, logger="jobs.reuse")
    a = RunDir(str(tmp_path / "a"))
    run_pipeline(load_config(None, [f"data.root={tiny_dataset}", f"output={a.root}", *TINY, *PCA]))
    (key,) = load_config(None, [*TINY, *PCA]).search_keys()
    keys = ["resnet18@64", key]
    queries = tmp_path / "new_queries"
    queries.mkdir()
    for name in ("Q000.jpg", "Q002.jpg", "Q005.jpg"):
        shutil.copy(tiny_dataset / "queries" / name, queries / name)
    ref = tiny_dataset / "references" / "R001.jpg"
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))  # restored: new mtime, same bytes
    folders = [f"data.queries={queries}", f"data.references={tiny_dataset / 'references'}",
               f"data.train={tiny_dataset / 'train'}"]
    b = RunDir(str(tmp_path / "b"))
    cfg = load_config(None, [*folders, f"output={b.root}", *TINY, *PCA])
    run_pipeline(cfg, reuse=a.root)

    assert lent_shards(a, b, keys) == shards_of(a, keys, "reference", "train")  # and no query shard
    assert all(shards_of(a, keys, "train")) and same_file(a.pca(key), b.pca(key))
    assert {n.split("-")[0] for n in shard_names(b.features(key))} == {"query", "reference", "train"}
    # the queries' answers are the lender's for the same query images
    mine = predictions(b)
    assert mine and mine == [r for r in predictions(a) if r["query_id"] in {"Q000", "Q002", "Q005"}]
    assert "reuse: reference, train from" in caplog.text
    assert [r.get("reused_from") for r in json.loads(open(b.environment).read())] == [a.root]
    assert f"reference and train shards from {a.root}" in environment.summary(b)

    # a split whose files differ, or a folder of other settings, is not lent; the rest is
    caplog.clear()
    refs = tmp_path / "more_references"
    shutil.copytree(tiny_dataset / "references", refs)
    shutil.copy(tiny_dataset / "train" / "T000.jpg", refs / "R100.jpg")
    c = RunDir(str(tmp_path / "c"))
    other = load_config(None, [f"data.queries={queries}", f"data.references={refs}",
                               f"data.train={tiny_dataset / 'train'}", f"output={c.root}", *TINY, *PCA,
                               "extract.chunk_patches=7"])
    run_stages(other, ["manifest"], reuse=a.root)
    assert lent_shards(a, c, keys) == [*shards_of(a, keys, "train")[:3], [], []]
    assert "reuse: reference not lent: its files are not those" in caplog.text and "9 added" in caplog.text
    assert f"{a.features('resnet18@64')} not lent for train: made with other settings" in caplog.text
    assert not os.path.exists(c.pca(key))  # reduce is not lent without its members' train features

    # again, stage by stage (the command line, last: it sets up its own log handlers): nothing new to lend
    capsys.readouterr()
    assert main(["manifest", "--out", b.root, "--reuse", a.root]) == 0
    assert f"reuse: nothing new to take from {a.root}" in capsys.readouterr().err


def test_reuse_names_a_folder_it_cannot_lend_from(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["run", "--out", out, "--set", f"data.root={tiny_dataset}", *sum((["--set", s] for s in TINY), [])]
    assert main([*args, "--reuse", str(tmp_path)]) == 2
    assert f"--reuse {tmp_path}: not a run folder with pinned inputs and a manifest" in capsys.readouterr().err
    assert main([*args, "--reuse", out]) == 2
    assert "is this run's own folder (--out)" in capsys.readouterr().err
    assert not os.path.exists(out)  # refused before anything was written
    with pytest.raises(InputError, match="between local run folders only"):
        run_stages(load_config(None, [f"data.root={tiny_dataset}", f"output={out}"]), reuse="s3://bucket/run")
