"""End to end on local Ray: a handful of images, bad files among them, then a resume."""
import csv
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import yaml

from core.imageio import load_rgb
from core.metrics import read_predictions, written
from core.models.registry import default_registry_dir
from core.settings import SETTINGS_FILE, SettingsChanged
from core.store import join, list_shards, read_table
from ensemble.reduce import load_pca
from ensemble.decoys import estimate_threshold, q_at
from ensemble.fuse import demote_others, top_k_per_query
from ensemble.verify import verify_pairs
from jobs.cli import main
from jobs.config import load_config
from jobs.completeness import IncompleteUpstream
from jobs.inputs import InputError
from jobs.layout import RunDir
from jobs.pipeline import STAGES, evaluate_run, run_pipeline, run_stages
from jobs.stages import verify as verify_stage
from jobs.stages.verify import Pass, score_pairs, scorer_for, scorer_jobs, store_folder, unscored
from tests.badimages import EXPECTED, make_bad_images

REPO = Path(__file__).resolve().parent.parent

TINY = ["models.0.name=resnet18", "models.0.scales=[64]", "models.0.batch_size=8", "patches.shard_size=5",
        "search.k=5", "fuse.k=3"]


def _mtimes(folder):
    return {p: os.stat(os.path.join(folder, p)).st_mtime_ns for p in sorted(os.listdir(folder))}


def test_end_to_end_with_bad_inputs_and_resume(ray_local, tiny_dataset, tmp_path):
    bad = make_bad_images(tiny_dataset / "queries")
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output={out}", *TINY])
    m = run_pipeline(cfg)
    run = RunDir(str(out))

    errors = read_table(run.errors).column("path").to_pylist()
    manifest = read_table(run.manifest)
    ids = set(manifest.column("image_id").to_pylist())
    for name, path in bad.items():
        if EXPECTED[name]["error"]:
            assert any(str(path) in e for e in errors), f"{name} not recorded in errors.parquet"
            assert path.stem not in ids
        else:
            assert path.stem in ids, f"{name} should decode"
            row = manifest.filter(pc.equal(manifest.column("image_id"), path.stem)).to_pylist()[0]
            assert (row["width"], row["height"]) == EXPECTED[name]["size"], name

    with open(run.predictions) as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"query_id", "reference_id", "score"}
    per_query = {}
    for r in rows:
        per_query.setdefault(r["query_id"], []).append(float(r["score"]))
    assert all(len(s) <= 3 for s in per_query.values())
    assert {r["reference_id"] for r in rows} <= {f"R{i:03d}" for i in range(8)}
    assert 0.0 <= m.micro_ap <= 1.0 and os.path.getsize(run.pr_curve) > 0
    made = json.loads(open(run.environment).read())
    assert [r["stages"] for r in made] == [list(STAGES)] and made[0]["ray_cluster"]["CPU"] >= 1
    assert made[0]["packages"]["copydet"] == importlib.metadata.version("copydet") and "torch" in made[0]["packages"]
    def scores(table):
        return {(r["query_id"], r["reference_id"]): r["score"] for r in table.to_pylist()}
    fused, final = scores(read_table(run.fused)), scores(demote_others(read_table(run.fused), 0.1))
    assert final != fused  # fused.parquet keeps the fused scores; predictions.csv lowers each query's others
    assert {k: pytest.approx(v, abs=1e-6) for k, v in final.items()} == {
        (r["query_id"], r["reference_id"]): float(r["score"]) for r in rows}

    # Re-running skips every finished shard and gives the same predictions.
    feats = run.features("resnet18@64")
    before, preds_before = _mtimes(feats), open(run.predictions).read()
    run_pipeline(cfg)
    assert _mtimes(feats) == before
    assert open(run.predictions).read() == preds_before

    # Verification re-scores from fused.parquet: scores only rise (the bonus alone: no demotion),
    # and a second run is a no-op.
    vcfg = load_config(None, [f"data.root={tiny_dataset}", f"output={out}", *TINY, "verify.enabled=true",
                              "verify.top_k=2", "verify.min_inliers=0", "verify.saturate=10", "fuse.demote_others=0"])
    run_stages(vcfg, ["fuse", "verify"])
    checked = read_table(join(run.verify, "rootsift"))  # each scorer caches its own (default: rootsift)
    assert checked.num_rows == sum(min(2, len(s)) for s in per_query.values())
    verified = {(r["query_id"], r["reference_id"]): float(r["score"]) for r in csv.DictReader(open(run.predictions))}
    fused = read_table(run.fused).to_pylist()
    assert all(verified[(f["query_id"], f["reference_id"])] >= f["score"] - 1e-6 for f in fused)
    assert [r["stages"] for r in json.loads(open(run.environment).read())] == [list(STAGES)] * 2 + [["fuse", "verify"]]
    once = open(run.predictions).read()
    run_stages(vcfg, ["verify"])
    assert open(run.predictions).read() == once
    assert read_table(join(run.verify, "rootsift")).num_rows == checked.num_rows
    # verification turned off again: the predictions are the fused ones, as config.yaml now says
    fused_only = vcfg.model_copy(update={"verify": vcfg.verify.model_copy(update={"enabled": False})})
    run_stages(fused_only, ["fuse"])
    fused_preds = open(run.predictions).read()
    with pytest.raises(IncompleteUpstream, match=r"holds the fused scores.*run `copydet verify --out"):
        evaluate_run(vcfg)  # fuse run again after verify: a verifying config's figures would be the fused ones
    assert evaluate_run(fused_only) is not None
    run_stages(vcfg, ["verify"])
    run_stages(fused_only, ["verify"])
    assert open(run.predictions).read() == fused_preds != once


def test_stage_commands_run_alone(ray_local, tiny_dataset, tmp_path):
    out = str(tmp_path / "run")
    assert main(["manifest", "--references", str(tiny_dataset / "references"),
                 "--queries", str(tiny_dataset / "queries"), "--out", out, *sum((["--set", s] for s in TINY), [])]) == 0
    assert read_table(RunDir(out).manifest).num_rows == 14
    assert main(["patch", "--out", out, "--set", f"data.root={tiny_dataset}"]) == 0
    patches = read_table(RunDir(out).patches)
    assert set(pc.unique(patches.column("kind")).to_pylist()) == {"full", "crop"}


def test_a_relative_out_is_the_drivers_folder_on_every_worker(ray_local, tiny_dataset, tmp_path, monkeypatch):
    """Ray's workers keep the folder they started in (on a cluster, each node its own): a relative
    run folder is the driver's, made absolute before any task sees it."""
    workers_cwd = ray.get(ray.remote(lambda: os.getcwd()).remote())
    monkeypatch.chdir(tmp_path)
    assert os.getcwd() != workers_cwd
    assert main(["manifest", "--references", str(tiny_dataset / "references"), "--queries",
                 str(tiny_dataset / "queries"), "--out", "rel", *sum((["--set", s] for s in TINY), [])]) == 0
    assert read_table(RunDir(str(tmp_path / "rel")).manifest).num_rows == 14
    assert not os.path.exists(os.path.join(workers_cwd, "rel"))


def test_a_stage_run_before_its_input_records_no_settings(ray_local, tmp_path, capsys):
    """A pinned settings file of a stage that never ran would refuse the next run's other settings;
    nor is a config.yaml written into a folder that has no manifest."""
    fresh = tmp_path / "fresh"
    assert main(["extract", "--out", str(fresh)]) == 2
    assert "run `copydet manifest` first" in capsys.readouterr().err and not (fresh / "config.yaml").exists()
    out = tmp_path / "run"
    assert main(["manifest", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["extract", "--out", str(out)]) == 2
    assert "copydet patch" in capsys.readouterr().err and not (out / "features").exists()


def test_a_later_stage_keeps_the_data_section_the_manifest_was_made_from(ray_local, tiny_dataset, tmp_path,
                                                                        monkeypatch):
    """Re-running one stage with another config's folders must not make config.yaml name them:
    report and index --from-run read the ground truth from it."""
    out = tmp_path / "run"
    monkeypatch.chdir(tiny_dataset.parent)  # a relative root is saved absolute: report may run elsewhere
    run_stages(load_config(None, [f"data.root={tiny_dataset.name}", f"output={out}", *TINY]), ["manifest"])
    run_stages(load_config(None, [f"output={out}", *TINY, "patches.query.preset=global"]), ["patch"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tiny_dataset) and saved["patches"]["query"]["preset"] == "global"
    # the registry too: from another folder, sscd would be fetched again into that folder's ./models
    assert saved["registry"] == os.path.abspath(default_registry_dir())


def test_a_ray_tasks_error_is_printed_without_the_remote_traceback():
    from ray.exceptions import RayTaskError

    from core.imageio import ImageDecodeError
    from jobs.cli import USER_ERRORS, _message

    cause = ImageDecodeError("/data/R001.jpg", "not an image")
    wrapped = RayTaskError("describe_chunk", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
    assert isinstance(wrapped, USER_ERRORS) and _message(wrapped) is cause


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    """A read-only or full disk, or a file where the run folder goes, ended in a traceback and exit 1;
    in a Ray worker, in a traceback of Ray's."""
    import errno

    from ray.exceptions import RayTaskError

    from jobs.cli import USER_ERRORS, _message
    (tmp_path / "taken").write_text("")
    assert main(["run", "--out", str(tmp_path / "taken")]) == 2
    assert f"copydet run: error: {tmp_path / 'taken'}: a file, not a folder" in capsys.readouterr().err
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/features/query-0.parquet")
    wrapped = RayTaskError("embed", "Traceback ...", full).as_instanceof_cause()
    assert isinstance(wrapped, USER_ERRORS)
    assert _message(wrapped) == "/data/run/features/query-0.parquet: No space left on device"
    assert _message(OSError(errno.EROFS, "Read-only file system", "runs/x")) == "runs/x: Read-only file system"


def test_the_stages_the_command_line_offers_are_the_pipelines_in_order():
    """`copydet submit --stage` offers :data:`jobs.stages.NAMES` without importing the runners."""
    from jobs.pipeline import STAGES
    from jobs.stages import NAMES

    assert tuple(STAGES) == NAMES


def test_ctrl_c_ends_in_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    """Not Ray's traceback: what was finished is kept, the same command goes on."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("jobs.pipeline.run_pipeline", interrupted)
    assert main(["run", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "copydet run: interrupted; what it finished is kept (run it again to go on)" in err
    assert "Traceback" not in err


def test_sigterm_ends_like_ctrl_c_and_the_same_command_goes_on(ray_local, tiny_dataset, tmp_path):
    """A scheduler's or container's stop (SIGTERM) once Ray runs: not Ray's abort (exit 134) with a
    native stack dump, but one line and exit 143; the run then resumes to the uninterrupted result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sets = sum((["--set", s] for s in [f"data.root={tiny_dataset}", *TINY]), [])
    argv = ["run", "--out", str(tmp_path / "run"), *sets]
    cmd = [sys.executable, "-m", "jobs.cli", *argv]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("extract:"):  # Ray is up, its model actors start
            proc.send_signal(signal.SIGTERM)
            break
    err = proc.stderr.read()
    assert proc.wait(120) == 143, err[-2000:]
    assert "copydet run: stopped (SIGTERM); what it finished is kept (run it again to go on)" in err
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert main(argv) == 0
    log = (tmp_path / "run" / "copydet.log").read_text()
    assert log.count("--- pid ") == 2 and log.index("ERROR ended by Stopped") < log.rindex("--- pid ")


def test_cli_errors_are_clear(capsys):
    assert main(["fuse", "--set", "search.kk=1"]) == 2
    err = capsys.readouterr().err
    assert "smoke.yaml with --set search.kk=1: invalid config" in err and "search.kk: unknown key" in err
    assert main(["fuse", "--set", "search.k=x", "--out", "runs/a b"]) == 2  # --out named as given
    assert "smoke.yaml with --set search.k=x --out runs/a b: invalid config" in capsys.readouterr().err
    for argv in (["patch", "--preview", "-2"], ["report", "run", "--k", "0"], ["plan", "--images", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"argument {argv[-2]}: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # evaluate starts no Ray: --address is not silently taken
        main(["evaluate", "--address", "auto"])
    assert "unrecognized arguments: --address" in capsys.readouterr().err


def test_a_command_asked_what_it_cannot_do_says_so_in_one_line(tmp_path, capsys):
    """Exit 2 and one line, not exit 1 with an info line or a traceback."""
    assert main(["evaluate", "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "run")]) == 2
    assert "copydet evaluate: error: no ground truth to score against" in capsys.readouterr().err
    assert main(["index", "remove", str(tmp_path), "--ids-file", str(tmp_path)]) == 2  # a folder, not a file
    assert "Traceback" not in capsys.readouterr().err
    assert main(["submit", "--stage", "pretrain"]) == 2
    assert "copydet submit: error: --stage pretrain: give the training config" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("bogus_key: 1\n")  # submit checks the run folder's own, as the stages do
    assert main(["submit", "--out", str(run), "--address", "http://127.0.0.1:1"]) == 2
    assert "bogus_key: unknown key" in capsys.readouterr().err


def test_reduce_stage_pca_stretch_and_concat(ray_local, tiny_dataset, tmp_path):
    """Derived members: PCA fit on train/ (saved, reused), stretching, concatenation of two scales."""
    out = tmp_path / "run"
    base = [f"data.root={tiny_dataset}", f"output={out}", *TINY, "models.0.scales=[64, 80]"]
    run_stages(load_config(None, base), ["manifest", "patch", "extract"])
    cfg = load_config(None, [*base, "reduce.dim=4", "reduce.stretch=true", "reduce.stretch_neighbours=2",
                             "reduce.concat=true"])
    (key,) = cfg.search_keys()
    assert key == "resnet18@64+resnet18@80~pca4w~st2b0.5"
    run_stages(cfg, ["reduce", "search", "fuse"])
    run = RunDir(str(out))
    feats = read_table(run.features(key))
    assert feats.schema.field("embedding").type.list_size == 4
    assert feats.num_rows == read_table(run.features("resnet18@64")).num_rows
    assert set(read_table(run.candidates(key)).column("model").to_pylist()) == {key}
    pca_file = out / "reduce" / f"{key}.safetensors"
    stamp = pca_file.stat().st_mtime_ns
    run_stages(cfg, ["reduce"])
    assert pca_file.stat().st_mtime_ns == stamp
    # the PCA's sample size is not in the key: another one is refused before anything is read
    with pytest.raises(SettingsChanged, match=r"fit_rows: 200000 -> 10"):
        run_stages(cfg.model_copy(update={"reduce": cfg.reduce.model_copy(update={"fit_rows": 10})}), ["reduce"])
    assert pca_file.stat().st_mtime_ns == stamp
    # with the folder deleted as that error advises, the PCA is fit again: the file is not reused
    shutil.rmtree(run.features(key))
    run_stages(cfg.model_copy(update={"reduce": cfg.reduce.model_copy(update={"fit_rows": 10})}), ["reduce"])
    assert load_pca(pca_file).fit_rows == 10
    # a PCA the train descriptors cannot give is refused naming the keys, not cut to their number
    with pytest.raises(ValueError, match=r"reduce.dim=64 needs more than 64 train descriptors"):
        run_stages(load_config(None, [*base, "reduce.dim=64"]), ["reduce"])

    # Other search settings on the finished folder are refused, naming the change; nothing is rewritten.
    candidates = _mtimes(run.candidates(key))
    with pytest.raises(SettingsChanged, match=r"k: 5 -> 7"):
        run_stages(cfg.model_copy(update={"search": cfg.search.model_copy(update={"k": 7})}), ["search"])
    assert _mtimes(run.candidates(key)) == candidates
    with pytest.raises(SettingsChanged, match=r"manifest shards .*folders"):
        run_stages(cfg.model_copy(update={"data": cfg.data.model_copy(update={"queries": str(tmp_path)})}),
                   ["manifest"])


def test_run_command_ends_with_the_metrics_and_the_report(ray_local, tiny_dataset, tmp_path, capsys):
    """The README's main command: `copydet run` writes report.html and says where, after the metrics;
    the root's queries_meta.csv (the bundled sample has one) gives its recall per transform family."""
    (tiny_dataset / "queries_meta.csv").write_text("query_id,transforms\nQ000,flip\nQ001,crop\n")
    sets = sum((["--set", s] for s in [f"data.root={tiny_dataset}", *TINY]), [])
    assert main(["run", "--out", str(tmp_path / "a"), *sets]) == 0
    report = tmp_path / "a" / "report.html"
    assert "Recall@1 per transform family" in report.read_text()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("done: μAP") and last.endswith(f"report: {report}")
    log = (tmp_path / "a" / "copydet.log").read_text().splitlines()  # the run folder keeps the lines, timed
    assert log[0].startswith("--- pid ") and log[-1].endswith(last) and any("[extract] done in" in x for x in log)
    assert "made with copydet " in report.read_text()
    # the run started again with another member and stopped: its old predictions are not that config's
    assert main(["manifest", "--out", str(tmp_path / "a"), *sets, "--set", "models.0.scales=[96]"]) == 0
    for argv in (["report", str(tmp_path / "a")], ["compare", str(tmp_path / "a")]):
        assert main(argv) == 2
        assert f"{argv[0]}: {tmp_path / 'a' / 'candidates' / 'resnet18@96'} is incomplete" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "b"), "--no-report", *sets]) == 0
    assert not (tmp_path / "b" / "report.html").exists()


def test_auto_threshold_from_train_decoys(ray_local, tiny_dataset, tmp_path):
    """fuse.threshold auto: the train photos are searched and fused as references are, the threshold
    is estimated from them on the final scores (verified ones too), and copies.csv follows it."""
    out = tmp_path / "run"
    sets = [f"data.root={tiny_dataset}", f"output={out}", *TINY, "fuse.threshold=auto",
            "fuse.threshold_precision=0.5", "fuse.decoy_folds=2"]
    run_pipeline(load_config(None, sets))
    run = RunDir(str(out))
    key = "resnet18@64"
    assert os.listdir(run.decoys(key)) == os.listdir(run.candidates(key))
    decoys = read_table(run.fused_decoys)
    assert decoys.num_rows and set(decoys.column("reference_id").to_pylist()) <= {f"T{i:03d}" for i in range(6)}

    def check(scores: str, precision: float = 0.5) -> None:
        record = json.loads(open(run.threshold).read())
        preds = read_predictions(run.predictions)
        assert record["scores"] == scores and record["references_per_train"] == pytest.approx(8 / 6)
        assert record["ratio"] == pytest.approx(8 / 6 * (record["folds"] - 1) / record["folds"])  # a decoy's weight
        if scores == "fused":
            lowered = demote_others(decoys, 0.1, read_table(run.fused))  # below the query's best prediction
            want = estimate_threshold(preds.column("score").cast(pa.float32()).to_numpy(),  # the fused scores
                                      lowered.column("score").to_numpy(),
                                      record["ratio"], precision)
            assert record["pairs"] == want.pairs
            assert record["threshold"] == (None if want.threshold is None else written(want.threshold))
        t = record["threshold"]
        if t is None:
            assert not os.path.exists(run.copies)
        else:
            kept = pc.greater_equal(preds.column("score"), t)  # the CSV's scores against the recorded number
            assert read_predictions(run.copies).num_rows == pc.sum(kept).as_py() == record["pairs"]
            rows = list(csv.DictReader(open(run.copies)))  # each copy's estimated false share of those above it
            q = [float(r["q_value"]) for r in rows]
            assert q == sorted(q) and 0 < q[-1] <= 1 - precision + 1e-9
            assert abs(q[-1] - (1 - record["precision"])) < 1e-3  # the last copy's: the threshold's estimate
            served = [q_at(record["q_curve"], float(r["score"])) for r in rows]  # what an index built here answers
            assert all(0 <= a - b < 1.01e-3 for a, b in zip(served, q))  # rounded up to 0.001
            text = open(run.threshold).read()  # one line per curve point
            assert text.count("\n") == len(record) + 1 + len(record["q_curve"]) + 1

    check("fused")
    assert json.loads(open(run.metrics).read()).get("threshold") == json.loads(open(run.threshold).read())["threshold"]
    assert os.path.exists(run.copies)
    # Unreachable with this run's few pairs: one decoy more than found is always counted.
    run_stages(load_config(None, [*sets, "fuse.threshold_precision=0.999"]), ["fuse"])
    assert json.loads(open(run.threshold).read())["threshold"] is None
    check("fused", 0.999)
    run_stages(load_config(None, sets), ["fuse"])
    vcfg = load_config(None, [*sets, "verify.enabled=true", "verify.top_k=2", "verify.decoy_top_k=1",
                              "verify.min_inliers=0", "verify.saturate=10"])
    run_stages(vcfg, ["fuse", "verify"])
    per_query = [Counter(read_table(join(run.verify, name)).column("query_id").to_pylist())
                 for name in ("rootsift", "rootsift-decoys")]
    assert max(per_query[0].values()) == 2 and set(per_query[1].values()) == {1}  # decoys: the best one only
    assert set(per_query[1]) == set(decoys.column("query_id").to_pylist())
    check("verified")
    assert not os.path.exists(store_folder(run, "rootsift"))  # the descriptions are scratch


def test_each_image_is_described_once_per_run(ray_local, tiny_dataset, tmp_path, monkeypatch):
    """Predictions and decoys are verified from one store of descriptions: a query is described once
    for both, a reference once however many queries' candidates it is among. A describe task is
    sent the files it describes, not every path of the run."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output={out}", *TINY, "fuse.threshold=auto",
                             "fuse.decoy_folds=2", "verify.enabled=true", "verify.top_k=3", "verify.decoy_top_k=2"])
    run_stages(cfg, ["manifest", "patch", "extract", "search", "fuse"])
    run = RunDir(str(out))
    paths = {split: {r["image_id"]: r["path"] for r in read_table(run.manifest).to_pylist() if r["split"] == split}
             for split in ("query", "reference", "train")}
    sent, run_tasks = [], verify_stage.run_tasks

    def recorded(fn, calls, *args):
        sent.extend(calls if fn is verify_stage.describe_chunk else [])
        return run_tasks(fn, calls, *args)
    monkeypatch.setattr(verify_stage, "run_tasks", recorded)
    preds, decoys = Pass(read_table(run.fused), 3), Pass(read_table(run.fused_decoys), 2, decoys=True)
    def score(config, p):
        job = scorer_jobs(config)["rootsift"]
        return score_pairs("rootsift", job, run, unscored(run, "rootsift", job.settings, p).pairs, p.top_k, p.decoys)
    for p in (preds, decoys):
        score(cfg, p)
    stored = {split: Counter(i for shard in list_shards(store_folder(run, "rootsift"), f"{split}-")
                             for i in read_table(shard, ["image_id"]).column(0).to_pylist())
              for split in ("query", "reference", "train")}
    assert all(set(c.values()) == {1} for c in stored.values())
    assert sorted((split, i) for images, split, *_ in sent for i, _ in images) == \
        sorted((split, i) for split, c in stored.items() for i in c)
    assert all(paths[split][i] == path for images, split, *_ in sent for i, path in images)
    top = top_k_per_query(read_table(run.fused), 3)
    assert set(stored["query"]) == set(top.column("query_id").to_pylist())
    assert set(stored["reference"]) == set(top.column("reference_id").to_pylist())
    assert max(Counter(top.column("reference_id").to_pylist()).values()) > 1  # shared candidates were there
    decoy_top = top_k_per_query(read_table(run.fused_decoys), 2)
    assert set(stored["train"]) == set(decoy_top.column("reference_id").to_pylist())

    def rows(table):
        return {(r["query_id"], r["reference_id"]): (r["inliers"], r["keypoints"]) for r in table.to_pylist()}
    direct = verify_pairs(top, paths["query"], paths["reference"], 3, load_rgb,
                          scorer=scorer_for("rootsift", cfg))  # each image described as it is met
    assert rows(read_table(join(run.verify, "rootsift"))) == rows(direct)

    # Resumed after the scores were lost: nothing is described again. With other settings the
    # scratch is made anew (not refused: nothing in it is a result).
    store = store_folder(run, "rootsift")
    described = _mtimes(store)
    shutil.rmtree(join(run.verify, "rootsift"))
    score(cfg, preds)
    assert _mtimes(store) == described and rows(read_table(join(run.verify, "rootsift"))) == rows(direct)
    other = load_config(None, [f"data.root={tiny_dataset}", f"output={out}", *TINY, "verify.enabled=true",
                               "verify.top_k=3", "verify.max_side=128"])
    shutil.rmtree(join(run.verify, "rootsift"))
    score(other, preds)
    assert not list_shards(store, "train-")
    assert json.loads(open(join(store, SETTINGS_FILE)).read())["max_side"] == 128


def test_verification_describes_one_window_of_queries_at_a_time(ray_local, tiny_dataset, tmp_path, monkeypatch):
    """``verify.window`` bounds the scratch store: it holds one window's queries with their
    candidates and decoys, and is emptied before the next. The scores are those of one window.
    No window reads what earlier ones cached: a cache shard is read once by a fresh run (for the
    final scores) and twice by a resumed one (once more for the pairs left), however many windows."""
    out = tmp_path / "run"
    args = [f"data.root={tiny_dataset}", f"output={out}", *TINY, "fuse.threshold=auto", "fuse.decoy_folds=2",
            "verify.enabled=true", "verify.top_k=3", "verify.decoy_top_k=2"]
    cfg = load_config(None, args + ["verify.window=2"])
    run_stages(cfg, ["manifest", "patch", "extract", "search", "fuse"])
    run = RunDir(str(out))
    stores, remove = [], verify_stage.remove_dir

    def snapshot_then_remove(folder):
        if os.path.isdir(folder):
                stores.append({split: {i for shard in list_shards(folder, f"{split}-")
                                   for i in read_table(shard, ["image_id"]).column(0).to_pylist()}
                           for split in ("query", "reference", "train")})
        remove(folder)
    monkeypatch.setattr(verify_stage, "remove_dir", snapshot_then_remove)
    reads, read = Counter(), verify_stage.read_table

    def counted(path, *args, **kwargs):
        reads[path] += path.startswith(run.verify) and "-described" not in path
        return read(path, *args, **kwargs)
    monkeypatch.setattr(verify_stage, "read_table", counted)
    run_stages(cfg, ["verify"])
    assert not os.path.exists(store_folder(run, "rootsift"))
    assert len(+reads) >= 6 and set((+reads).values()) == {1}
    top, decoys = top_k_per_query(read_table(run.fused), 3), top_k_per_query(read_table(run.fused_decoys), 2)
    assert [sorted(s["query"]) for s in stores] == [["Q000", "Q001"], ["Q002", "Q003"], ["Q004", "Q005"]]
    for s in stores:
        for table, split in ((top, "reference"), (decoys, "train")):
            mine = table.filter(pc.is_in(table.column("query_id"), pa.array(sorted(s["query"]))))
            assert s[split] == set(mine.column("reference_id").to_pylist())

    def cached():
        return {name: sorted(tuple(r.values()) for r in read_table(join(run.verify, name)).to_pylist())
                for name in ("rootsift", "rootsift-decoys")}
    windowed, predictions = cached(), (out / "predictions.csv").read_text()
    for name in ("rootsift", "rootsift-decoys"):  # as if stopped in the last window: the others are passed over
        os.remove(list_shards(join(run.verify, name))[-1])
    reads.clear()
    run_stages(cfg, ["verify"])
    assert [sorted(s["query"]) for s in stores[3:]] == [["Q004", "Q005"]] and cached() == windowed
    assert len(+reads) >= 6 and max(reads.values()) == 2
    shutil.rmtree(run.verify)
    run_stages(load_config(None, args), ["verify"])  # one window
    assert len(stores) == 5 and stores[-1]["query"] == set(top.column("query_id").to_pylist())
    assert cached() == windowed and (out / "predictions.csv").read_text() == predictions
    os.makedirs(store_folder(run, "rootsift"))  # left by a run stopped after its last pair was cached
    run_stages(load_config(None, args), ["verify"])
    assert not os.path.exists(store_folder(run, "rootsift"))


def test_a_limited_run_is_scored_on_the_pairs_of_its_images(ray_local, tiny_dataset, tmp_path):
    """data.limit 4 takes Q000-Q003 and R000-R003: the copies of R005 and R007 cannot be found, so
    recall counts the two copies of R001 and R003 only."""
    out = tmp_path / "run"
    m = run_pipeline(load_config(None, [f"data.root={tiny_dataset}", f"output={out}", *TINY, "data.limit=4"]))
    assert m.n_positives == json.loads((out / "metrics.json").read_text())["n_positives"] == 2
    # a limit that keeps no copy is refused before any stage runs, not at evaluate after all of them
    with pytest.raises(InputError, match=r"no \(query, reference\) pair to evaluate among the images data.limit 1"):
        run_pipeline(load_config(None, [f"data.root={tiny_dataset}", f"output={tmp_path / 'one'}", *TINY,
                                        "data.limit=1"]))
    assert not (tmp_path / "one" / "manifest.parquet").exists()


def test_auto_threshold_needs_train_photos(tiny_dataset, tmp_path):
    shutil.rmtree(tiny_dataset / "train")
    with pytest.raises(ValueError, match="fuse.threshold: auto .* no train folder"):
        run_stages(load_config(None, [f"data.root={tiny_dataset}", f"output={tmp_path / 'r'}", *TINY,
                                      "fuse.threshold=auto"]))
