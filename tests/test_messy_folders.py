"""A messy image folder, as a new user has one: each case of issue 17 ends in the right result or
an early error that names the file or key (never a wrong result with exit 0).

Two runs share the module: a clean folder and a messy one (the clean images plus every kind of
mess). Cases that must be refused are refused before the extract stage, without writing shards
or config.yaml; the good images of the messy run score exactly as in the clean run.

| case | mess                                          | outcome                                            |
|------|-----------------------------------------------|----------------------------------------------------|
| 1    | ``Q003.jpg`` + ``Q003.png``                   | refused before the manifest, both files named      |
| 2    | reference ``Q000`` next to query ``Q000``     | verification opens the query's own file            |
| 3    | id with a comma, a quote and a line break     | quoted CSV, ``copydet evaluate`` round trip        |
| 4    | .txt, broken symlink, symlink loop, unreadable| each in errors.parquet with its reason; .jfif and  |
|      | folder, PNG over data.max_pixels, a name that | .JPEG used; a JPEG over the cap decoded at 1/2     |
|      | is not UTF-8; .jfif/.JPEG                     |                                                    |
| 5    | data.root missing, queries/ empty             | refused at start, folder named                     |
| 6    | ground truth: unknown ids, a repeated pair    | refused at start, ids and pair named               |
| 8    | images added / changed after the run          | refused, files named, nothing rewritten            |
| 9    | feature / candidates / manifest shard deleted,| search / fuse / evaluate / verify / patch refuse,  |
|      | fused.parquet deleted                         | naming it                                          |
| 10   | a second process in the run folder            | "in use by pid N", config.yaml untouched           |
| 11   | model re-registered (or its file replaced)    | refused by weights hash                            |
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from core.metrics import read_ground_truth, read_predictions, write_predictions
from core.models.backbones import build_backbone
from core.models.cards import RegistryError
from core.models.checkpoint import save_checkpoint
from core.models.registry import register
from core.models.resolve import card_from_checkpoint
from core.settings import SettingsChanged
from core.store import read_table
from jobs.cli import main
from jobs.completeness import IncompleteUpstream
from jobs.config import load_config
from jobs.inputs import InputError
from jobs.layout import RunDir
from jobs.lock import FolderBusy
from jobs.pipeline import evaluate_run, run_pipeline, run_stages
from jobs.stages.evaluate import evaluate_run_files, format_metrics
from tests.conftest import synthetic_photo

SAMPLE = Path(__file__).parent.parent / "bench" / "sample"
ODD = 'Q6,"odd"\nname'  # case 3: an id with a comma, a quote and a line break
CAP = 40_000  # data.max_pixels of both runs (case 4)
SETS = ["models=[{name: tiny-reg, scales: [32], batch_size: 16}]", "patches.shard_size=4",
        "patches.query={preset: global}", "patches.reference={preset: global}", "search.k=16",
        "search.cpus_per_shard=0.25", "fuse.k=16", f"data.max_pixels={CAP}", "verify.enabled=true",
        "verify.top_k=16", "verify.min_inliers=0", "verify.saturate=10"]
GT = [("Q000", "R001"), ("Q001", "R003"), ("Q002", "R005"), ("Q003", "R007"), ("Q006", "R006"),
      ("Q007", "R008")]


def write_gt(path: Path, pairs) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["query_id", "reference_id"])
        out.writerows(pairs)


def photo(name: str, side: int = 96) -> Image.Image:
    """A photo of the bundled sample, shrunk (real photos keep SIFT keypoints for verification)."""
    img = Image.open(SAMPLE / name).convert("RGB")
    img.thumbnail((side, side))
    return img


def make_clean(root: Path) -> Path:
    """References R000..R009 (R009 a 400x300 JPEG, over the pixel cap); queries Q000..Q007, six of
    them edited copies of references."""
    for sub in ("references", "queries"):
        (root / sub).mkdir(parents=True)
    refs = [photo(f"references/R{i + 1:04d}.jpg") for i in range(9)]
    for i, img in enumerate(refs):
        img.save(root / "references" / f"R{i:03d}.jpg", quality=90)
    synthetic_photo(9, (400, 300)).save(root / "references" / "R009.jpg", quality=90)
    crop = lambda im: im.crop((6, 6, im.width - 6, im.height - 6)).resize(im.size)  # noqa: E731
    edits = {0: (1, crop), 1: (3, lambda im: im.convert("L").convert("RGB")),
             2: (5, lambda im: im.resize((im.width * 5 // 4, im.height * 5 // 4))),
             3: (7, lambda im: im.crop((0, 0, im.width * 5 // 6, im.height * 5 // 6))),
             6: (6, crop), 7: (8, lambda im: im.resize((im.width * 5 // 6, im.height * 5 // 6)))}
    for q, (r, edit) in edits.items():
        edit(refs[r]).save(root / "queries" / f"Q{q:03d}.jpg", quality=85)
    for q in (4, 5):
        photo(f"train/T{q:04d}.jpg").save(root / "queries" / f"Q{q:03d}.jpg")
    write_gt(root / "ground_truth.csv", GT)
    return root


def make_messy(clean: Path, root: Path) -> Path:
    """The clean images (one query renamed to an odd id, two to .jfif / .JPEG) plus the mess of cases 2 and 4."""
    shutil.copytree(clean, root, symlinks=True)
    q, r = root / "queries", root / "references"
    (q / "Q006.jpg").rename(q / f"{ODD}.jpg")
    (q / "Q007.jpg").rename(q / "Q007.JPEG")
    (r / "R008.jpg").rename(r / "R008.jfif")
    photo("train/T0010.jpg").save(r / "Q000.jpg")                # case 2: a reference with a query's id
    (q / "notes.txt").write_text("not an image")                  # case 4: another extension
    (q / "broken.jpg").symlink_to(q / "missing.jpg")              #         a dangling symlink
    (q / "loop").symlink_to(q, target_is_directory=True)          #         a symlink loop
    (q / "locked").mkdir()                                        #         an unreadable folder
    synthetic_photo(701).save(q / "locked" / "Q100.jpg")
    (q / "locked").chmod(0)
    synthetic_photo(702, (300, 200)).save(r / "huge.png")         #         a PNG over the pixel cap
    synthetic_photo(703).save(os.fsdecode(os.fsencode(q) + b"/\xff\xfe.jpg"))  # a name that is not UTF-8
    write_gt(root / "ground_truth.csv", [(ODD if a == "Q006" else a, b) for a, b in GT])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Both folders and a registry with the tiny model ``tiny-reg``; the locked folder cannot be
    listed (as root, where chmod does not stop a read, os.scandir refuses it)."""
    base = tmp_path_factory.mktemp("messy")
    clean = make_clean(base / "clean")
    messy = make_messy(clean, base / "data")
    weights = base / "models" / "tiny.safetensors"
    weights.parent.mkdir()
    save_checkpoint(build_backbone("tiny_cnn"), weights)
    register(card_from_checkpoint(weights).model_copy(update={"name": "tiny-reg"}), base / "models")
    locked, scandir = messy / "queries" / "locked", os.scandir

    def guarded(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    with pytest.MonkeyPatch.context() as mp:
        if os.geteuid() == 0:
            mp.setattr(os, "scandir", guarded)
        yield base
    locked.chmod(0o755)


def config(base: Path, data: str | Path, out: str | Path, *extra: str):
    """The runs' config (``data`` and ``out``: names under ``base`` or absolute paths)."""
    return load_config(None, [f"data.root={base / data}", f"output={base / out}", f"registry={base / 'models'}",
                              *SETS, *extra])


def scores(out: Path, rename: dict[str, str] | None = None) -> dict[tuple[str, str], float]:
    preds = read_predictions(out / "predictions.csv").to_pylist()
    rename = rename or {}
    return {(rename.get(p["query_id"], p["query_id"]), p["reference_id"]): p["score"] for p in preds}


@pytest.fixture(scope="module")
def runs(tree, ray_local):
    """The clean run and the messy run, each through `copydet run`'s pipeline."""
    for data, out in (("clean", "clean-run"), ("data", "messy-run")):
        run_pipeline(config(tree, data, out))
    return tree


def test_good_images_score_as_in_the_clean_run(runs):
    clean = scores(runs / "clean-run")
    messy = scores(runs / "messy-run", {ODD: "Q006"})
    good = {k: v for k, v in messy.items() if k[1] != "Q000"}  # the reference of case 2 is extra
    assert good.keys() == clean.keys() and len(clean) == 8 * 10
    assert all(abs(good[k] - clean[k]) < 1e-5 for k in clean)
    assert set(messy) - set(good) == {(q, "Q000") for q, _ in clean}


def test_case2_same_id_in_two_splits_verifies_the_right_files(runs):
    """Query Q000 (a crop of R001) and reference Q000 (another photo): the pair (Q000, R001) is
    verified with the query's file: many inliers, as in the clean run, which has no reference Q000."""
    pairs = {}
    for out in ("clean-run", "messy-run"):
        v = read_table(runs / out / "verify.parquet")
        pairs[out] = {(q, r): n for q, r, n in zip(*(v.column(c).to_pylist()
                                                      for c in ("query_id", "reference_id", "inliers")))}
    assert pairs["messy-run"][("Q000", "R001")] == pairs["clean-run"][("Q000", "R001")] >= 20
    assert pairs["messy-run"][("Q000", "Q000")] <= 5  # the unrelated reference that shares its id


def test_case3_odd_ids_round_trip_through_the_csv(runs, capsys):
    out = runs / "messy-run"
    text = (out / "predictions.csv").read_text()
    assert '"Q6,""odd""\nname"' in text
    assert ODD in {p["query_id"] for p in read_predictions(out / "predictions.csv").to_pylist()}
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(out / "predictions.csv"),
                 "--ground-truth", str(runs / "data" / "ground_truth.csv")]) == 0
    m = json.loads((out / "metrics.json").read_text())  # written by the run
    assert f"μAP {m['micro_ap']:.4f} | R@P90 {m['recall_at_p90']:.4f}" in capsys.readouterr().out
    assert m["n_positives"] == len(GT) and m["recall_at_1"] == 1.0


def test_evaluate_scores_the_files_it_is_given(runs, tmp_path, capsys):
    """--ground-truth alone re-scores the run against that file; --predictions with a config scores that
    file against the config's ground truth; a ground truth that is not there is an error."""
    run = tmp_path / "run"
    shutil.copytree(runs / "messy-run", run)
    lines = (runs / "data" / "ground_truth.csv").read_text().splitlines()
    fewer = tmp_path / "gt.csv"
    fewer.write_text("\n".join(lines[:-1]) + "\n")  # one pair fewer
    assert main(["evaluate", str(run / "config.yaml"), "--out", str(run), "--ground-truth", str(fewer)]) == 0
    assert json.loads((run / "metrics.json").read_text())["n_positives"] == len(GT) - 1
    lost = tmp_path / "lost.csv"  # a copy of the reference that is over data.max_pixels
    lost.write_text("\n".join(lines) + "\nQ004,huge\n")
    capsys.readouterr()
    assert main(["evaluate", str(run / "config.yaml"), "--out", str(run), "--ground-truth", str(lost)]) == 0
    assert "1 ground-truth pair(s) name an image that did not decode" in capsys.readouterr().err
    assert main(["evaluate", str(run / "config.yaml"), "--out", str(run), "--ground-truth",
                 str(tmp_path / "missing.csv")]) == 2
    best = tmp_path / "best.csv"  # each query's best prediction only
    rows = read_predictions(run / "predictions.csv").to_pylist()
    firsts = {r["query_id"]: r for r in sorted(rows, key=lambda r: r["score"])}  # the last, best, stays
    write_predictions(pa.Table.from_pylist(list(firsts.values())), str(best))
    capsys.readouterr()
    assert main(["evaluate", str(run / "config.yaml"), "--predictions", str(best)]) == 0
    m = evaluate_run_files(str(best), read_ground_truth(runs / "data" / "ground_truth.csv"))
    assert format_metrics(m) in capsys.readouterr().out and len(firsts) < len(rows)
    assert main(["evaluate", "--predictions", str(best)]) == 2  # not the bundled sample's ground truth
    assert "give --ground-truth" in capsys.readouterr().err
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("\n".join(lines) + "\nQ9999,R9999\n")
    capsys.readouterr()  # a run folder given: the ground truth's ids are checked against its images
    assert main(["evaluate", "--out", str(run), "--predictions", str(best), "--ground-truth", str(unknown)]) == 2
    assert "query 'Q9999'" in capsys.readouterr().err
    foreign = tmp_path / "foreign.csv"  # predictions naming a reference the run does not have (were 0 lower μAP)
    write_predictions(pa.Table.from_pylist([*firsts.values(), {"query_id": rows[0]["query_id"],
                                            "reference_id": "RX999", "score": 9.0}]), str(foreign))
    assert main(["evaluate", "--out", str(run), "--predictions", str(foreign), "--ground-truth",
                 str(runs / "data" / "ground_truth.csv")]) == 2
    assert f"{foreign}: 1 id(s) of the predictions are not images of this run" in capsys.readouterr().err
    plot = tmp_path / "pr.png"  # no CONFIG: the run folder's own config.yaml; --threshold and --plot are honoured
    assert main(["evaluate", "--out", str(run), "--threshold", "0.5", "--plot", str(plot)]) == 0
    assert "at --threshold 0.5000" in capsys.readouterr().out and plot.is_file()  # not the config's number


def test_case4_every_file_is_in_the_manifest_or_in_errors(runs):
    out, q, r = runs / "messy-run", runs / "data" / "queries", runs / "data" / "references"
    errors = dict(zip(*(read_table(out / "errors.parquet").column(c).to_pylist() for c in ("path", "error"))))
    reasons = {q / "notes.txt": "not an image file extension", q / "broken.jpg": "broken symlink",
               q / "loop": "symlink loop", q / "locked": "cannot read folder", r / "huge.png": "too many pixels",
               q / "\\xff\\xfe.jpg": "the name is not UTF-8 text"}
    for path, reason in reasons.items():
        assert reason in errors[str(path)], (path, errors)
    assert "max_pixels" in errors[str(r / "huge.png")]
    manifest = read_table(out / "manifest.parquet")
    rows = {(m["split"], m["image_id"]): m for m in manifest.to_pylist()}
    assert len(rows) == manifest.num_rows == 11 + 8 and len(errors) == len(reasons)
    assert rows[("query", "Q007")]["path"].endswith(".JPEG") and rows[("reference", "R008")]["path"].endswith(".jfif")
    assert (rows[("reference", "R009")]["width"], rows[("reference", "R009")]["height"]) == (400, 300)  # drafted


def test_case1_one_id_two_files_is_refused_before_the_manifest(tree, tmp_path):
    data = tmp_path / "dup"
    shutil.copytree(tree / "clean", data)
    Image.open(data / "queries" / "Q003.jpg").save(data / "queries" / "Q003.png")
    cfg = config(tree, data, tmp_path / "run")
    with pytest.raises(InputError, match=r"'Q003' \(.*Q003\.jpg and .*Q003\.png\)"):
        run_stages(cfg)
    assert not (tmp_path / "run").exists()  # no shard, no config.yaml: the folder the lock made is gone


def test_case5_missing_or_empty_folders_are_named_at_start(tree, tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "a"), "--set", f"data.root={tmp_path / 'nope'}"]) == 2
    assert f"data.root: {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    data = tmp_path / "empty"
    shutil.copytree(tree / "clean", data)
    for f in (data / "queries").iterdir():
        f.unlink()
    (data / "queries" / "readme.txt").write_text("queries go here")
    assert main(["run", "--out", str(tmp_path / "b"), "--set", f"data.root={data}"]) == 2
    err = capsys.readouterr().err
    assert f"data.queries: {data / 'queries'} has no image files" in err and "1 other file" in err
    shutil.rmtree(data / "queries")
    assert main(["run", "--out", str(tmp_path / "c"), "--set", f"data.root={data}"]) == 2
    assert f"data.queries: no queries folder ({data / 'queries'} does not exist)" in capsys.readouterr().err
    assert not any((tmp_path / d / "config.yaml").exists() for d in "abc")


@pytest.mark.parametrize("folders, error", [
    ({"queries": "references"}, "data.references ({r}) and data.queries ({r}) are the same folder: each query "
                                "would find itself among the references"),
    ({"train": "references"}, "data.train ({r}) and data.references ({r}) are the same folder: normalisation "
                              "would subtract each reference's similarity to itself"),
    ({"train": "."}, "data.train ({d}) and data.references ({r}) are one inside the other"),
    ({"train": "queries"}, "data.train ({q}) and data.queries ({q}) are the same folder"),
])
def test_split_folders_that_overlap_are_refused_at_start(tree, tmp_path, capsys, folders, error):
    """They passed every check: the run went on, and normalised scores against the images themselves."""
    data = tree / "clean"
    sets = [f"data.{split}={data / sub}" for split, sub in {"references": "references", "queries": "queries",
                                                            **folders}.items()]
    assert main(["run", "--out", str(tmp_path / "run"), *sum((["--set", s] for s in sets), [])]) == 2
    names = {k: data / v for k, v in (("r", "references"), ("q", "queries"), ("d", "."))}
    assert error.format(**names) in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_split_of_which_no_image_decodes_stops_at_the_manifest(tree, tmp_path, capsys):
    data = tmp_path / "garbled"
    shutil.copytree(tree / "clean", data)
    for f in (data / "queries").iterdir():
        f.write_text("not a photo")
    assert main(["run", "--out", str(tmp_path / "run"), "--set", f"data.root={data}"]) == 2
    n = len(list((data / "queries").iterdir()))
    assert f"manifest: none of the {n} queries image(s) decodes" in capsys.readouterr().err
    assert not (tmp_path / "run" / "features").exists()


def test_case6_ground_truth_is_checked_against_the_inputs(tree, tmp_path):
    gt = tmp_path / "gt.csv"
    write_gt(gt, [*GT, ("Q999", "R001"), ("Q000", "R404")])
    cfg = config(tree, "clean", tmp_path / "run", f"data.ground_truth={gt}")
    with pytest.raises(InputError, match=r"2 id\(s\) .*query 'Q999', reference 'R404'"):
        run_stages(cfg)
    write_gt(gt, [*GT, GT[2]])
    with pytest.raises(ValueError, match=r"1 \(query_id, reference_id\) pair\(s\) listed more than once: "
                                         r"\('Q002', 'R005'\)"):
        run_stages(cfg)
    assert not (tmp_path / "run" / "manifest.parquet").exists()


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_case8_changed_inputs_are_refused_and_nothing_is_rewritten(runs):
    out, q = runs / "messy-run", runs / "data" / "queries"
    before = _mtimes(out)
    cfg = config(runs, "data", "messy-run")
    added = [q / f"Q9{i}.jpg" for i in range(3)]
    changed = q / "Q004.jpg"
    stat, data = changed.stat(), changed.read_bytes()
    try:
        for i, p in enumerate(added):
            synthetic_photo(900 + i).save(p)
        synthetic_photo(999).save(changed)
        with pytest.raises(InputError, match=r"3 added \(.*Q90\.jpg, .*Q91\.jpg, .*Q92\.jpg\); "
                                             r"1 changed \(.*Q004\.jpg\)"):
            run_pipeline(cfg)
        assert _mtimes(out) == before
    finally:
        for p in added:
            p.unlink()
        changed.write_bytes(data)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run_stages(cfg, ["manifest", "patch"])  # the same inputs again: accepted, nothing to redo but the records
    records = ("config.yaml", "environment.json", "copydet.log")
    assert _mtimes(out) == {**before, **{k: v for k, v in _mtimes(out).items() if k.endswith(records)}}


def test_case9_a_lost_shard_stops_the_stage_that_reads_it(runs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(runs / "messy-run", out)
    run = RunDir(str(out))
    cfg = config(runs, "data", out)
    features = Path(run.features("tiny-reg@32"))
    lost = [features / "query-00001-0000.parquet", features / "reference-00002-0000.parquet"]
    for p in lost:
        p.unlink()
    shutil.rmtree(out / "candidates")
    with pytest.raises(IncompleteUpstream, match=r"search: .*2 of 5 expected file\(s\) missing \(query-00001-0000"
                                                 r"\.parquet, reference-00002-0000\.parquet\); run `copydet extract`"):
        run_stages(cfg, ["search"])
    assert not (out / "candidates").exists()

    shutil.copytree(runs / "messy-run" / "candidates", out / "candidates")
    (out / "candidates" / "tiny-reg@32" / "query-00001-0000.parquet").unlink()
    for stage in ("fuse", "evaluate"):
        with pytest.raises(IncompleteUpstream, match=rf"{stage}: .*candidates.*query-00001-0000\.parquet"):
            run_stages(cfg, [stage]) if stage == "fuse" else evaluate_run(cfg)
    (out / "fused.parquet").unlink()
    with pytest.raises(IncompleteUpstream, match=r"verify: .*fused\.parquet is missing; run `copydet fuse`"):
        run_stages(cfg, ["verify"])
    (out / "manifest.parquet" / "query-00000.parquet").unlink()
    with pytest.raises(IncompleteUpstream, match=r"patch: .*manifest.parquet is incomplete.*query-00000\.parquet"):
        run_stages(cfg, ["patch"])


def test_case10_a_busy_run_folder_is_refused_and_config_kept(runs):
    out = runs / "messy-run"
    saved = (out / "config.yaml").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jobs.layout import RunDir; from jobs.lock import locked\n"
        f"with locked(RunDir({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(FolderBusy, match=rf"in use by pid {holder.pid} on "):
            run_pipeline(config(runs, "data", "messy-run", "fuse.k=5"))
        assert time.monotonic() - t0 < 30  # at once, not after waiting
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(SettingsChanged, match=r"k: 16 -> 5"):  # refused settings leave config.yaml too
        run_stages(config(runs, "data", "messy-run", "search.k=5"), ["search", "fuse"])
    assert (out / "config.yaml").read_bytes() == saved


def test_case11_a_model_is_pinned_by_the_content_of_its_weights(runs):
    models = runs / "models"
    card_path, weights = models / "tiny-reg.json", models / "tiny.safetensors"
    card, data = card_path.read_bytes(), weights.read_bytes()
    cfg = config(runs, "data", "messy-run")
    try:
        other = models / "other.safetensors"
        save_checkpoint(build_backbone("tiny_cnn", seed=1), other)
        register(card_from_checkpoint(other).model_copy(update={"name": "tiny-reg"}), models)
        with pytest.raises(SettingsChanged, match=r"tiny-reg@32: extract shards .*weights_sha256: '[0-9a-f]{64}' -> "):
            run_stages(cfg, ["extract"])
        card_path.write_bytes(card)
        shutil.copyfile(other, weights)  # same name, same card, other bytes
        with pytest.raises(RegistryError, match=r"model 'tiny-reg': .*tiny\.safetensors changed since the card"):
            run_stages(cfg, ["extract"])
    finally:
        card_path.write_bytes(card)
        weights.write_bytes(data)
    before = _mtimes(runs / "messy-run" / "features")
    run_stages(cfg, ["extract"])  # the registered content again: accepted, nothing to redo
    assert _mtimes(runs / "messy-run" / "features") == before
