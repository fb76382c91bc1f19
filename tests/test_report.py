"""`copydet report` on a tiny hand-made run folder whose metrics are computed by hand."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from PIL import Image

from core.contracts import CANDIDATES_SCHEMA, MANIFEST_SCHEMA
from core.metrics import write_predictions
from core.store import write_table
from jobs.cli import main

GT = [("Q0", "R0"), ("Q1", "R1"), ("Q2", "R2")]
# member a, image level: Q0-R0 .95 T, Q1-R3 .8 F, Q2-R2 .7 T, Q3-R3 .6 F, Q0-R1 .5 F, Q1-R1 .4 T
# -> precisions at the copies 1, 2/3, 3/6: μAP = (1 + 2/3 + 1/2) / 3 = 13/18
MEMBER_A = [("Q0", 0, "R0", 0, 0.9), ("Q0", 1, "R0", 2, 0.95), ("Q0", 0, "R1", 0, 0.5), ("Q1", 0, "R1", 0, 0.4),
            ("Q1", 2, "R3", 0, 0.8), ("Q2", 0, "R2", 1, 0.7), ("Q3", 0, "R3", 0, 0.6)]
# member b: Q3-R2 .95 F, Q1-R1 .9 T, Q0-R0 .6 T (Q2-R2 never found) -> μAP = (1/2 + 2/3) / 3 = 7/18
MEMBER_B = [("Q0", 0, "R0", 0, 0.6), ("Q1", 0, "R1", 0, 0.9), ("Q3", 0, "R2", 0, 0.95)]
# ensemble: three copies ranked above the one non-copy -> μAP 1
ENSEMBLE = [("Q0", "R0", 0.95), ("Q1", "R1", 0.9), ("Q2", "R2", 0.7), ("Q3", "R3", 0.6)]
META = "query_id,transforms\nQ0,flip;crop\nQ1,crop\nQ2,blur\nQ3,crop\n"


def candidates(rows: list[tuple], model: str) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(CANDIDATES_SCHEMA.names, (*r[:4], model, r[4]))) for r in rows],
                                CANDIDATES_SCHEMA)


def predictions(rows: list[tuple[str, str, float]]) -> pa.Table:
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(["query_id", "reference_id", "score"])})


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run, images = tmp_path / "run", tmp_path / "images"
    images.mkdir()
    manifest = []
    for i, image_id in enumerate(["Q0", "Q1", "Q2", "Q3", "R0", "R1", "R2", "R3"]):
        path = images / f"{image_id}.png"
        Image.new("RGB", (64, 48), (30 * i, 200 - 20 * i, 90)).save(path)
        manifest.append({"image_id": image_id, "path": str(path), "split": "query" if image_id[0] == "Q" else
                         "reference", "width": 64, "height": 48, "sha256": "x"})
    for split in ("query", "reference"):  # shards named by split, as the manifest stage writes them
        rows = [r for r in manifest if r["split"] == split]
        write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA), run / "manifest.parquet" / f"{split}-00000.parquet")
    write_table(candidates(MEMBER_A, "a"), run / "candidates" / "a@224" / "query-00000.parquet")
    write_table(candidates(MEMBER_B, "b"), run / "candidates" / "b@224" / "query-00000.parquet")
    write_predictions(predictions(ENSEMBLE), run / "predictions.csv")
    (tmp_path / "gt.csv").write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in GT))
    (tmp_path / "meta.csv").write_text(META)
    return run


def metric(page: str, name: str, key: str) -> str:
    row = re.search(rf'<tr data-name="{re.escape(name)}">(.*?)</tr>', page).group(1)
    return re.search(rf'<td class="{key}">([^<]*)</td>', row).group(1)


def test_report_html_metrics_figures_and_gallery(run_dir):
    gt, meta = run_dir.parent / "gt.csv", run_dir.parent / "meta.csv"
    assert main(["report", str(run_dir), "--ground-truth", str(gt), "--meta", str(meta)]) == 0
    page = (run_dir / "report.html").read_text()
    assert metric(page, "a@224", "micro_ap") == f"{13 / 18:.4f}"
    assert metric(page, "b@224", "micro_ap") == f"{7 / 18:.4f}"
    assert metric(page, "ensemble", "micro_ap") == "1.0000"
    assert metric(page, "a@224", "recall_at_p90") == f"{1 / 3:.4f}"  # only the first prediction has P >= 0.9
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert {"report/pr_curves.png", "report/families.png", "report/scores.png"} <= set(srcs)
    assert all(not s.startswith(("/", "http")) and (run_dir / s).is_file() for s in srcs)
    # crop family: queries Q0, Q1 -> the ensemble ranks both copies first, member a only Q0's
    crop = re.search(r"<tr><td>crop</td><td>2</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>([^<]*)</td>", crop) == ["0.5000", "1.0000", "1.0000"]
    # the one false positive of the ensemble, with both thumbnails and every scorer
    assert re.search(r"<b>Q3</b> → <b>R3</b><br>a@224 0\.600, ensemble 0\.600</div>", page)
    assert len([s for s in srcs if s.startswith("report/thumbs/")]) == 2
    assert "http" not in page and "<script" not in page


def test_ground_truth_comes_from_the_saved_config(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    config = {"models": [{"name": "resnet18"}], "data": {"ground_truth": str(run_dir.parent / "gt.csv")}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["report", "--out", str(run_dir)]) == 0  # the run folder as the other commands take it
    page = (run_dir / "report.html").read_text()
    assert metric(page, "ensemble", "micro_ap") == "1.0000" and "Recall@1 per transform family" not in page
    assert main(["report"]) == 2 and main(["report", str(run_dir), "--out", str(run_dir)]) == 2


def test_report_names_the_input_files_that_could_not_be_read(run_dir, tmp_path):
    from core.contracts import ERRORS_SCHEMA
    bad = [{"path": str(tmp_path / f"Q{i}.jpg"), "error": "not an image"} for i in (8, 9)]
    write_table(pa.Table.from_pylist(bad, ERRORS_SCHEMA), run_dir / "errors.parquet" / "part-00000.parquet")
    assert main(["report", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv")]) == 0
    assert f"2 input file(s) could not be read ({run_dir / 'errors.parquet'})" in (run_dir / "report.html").read_text()


def test_report_without_ensemble_uses_the_last_member(run_dir):
    (run_dir / "predictions.csv").unlink()
    assert main(["report", str(run_dir), "--ground-truth", str(run_dir.parent / "gt.csv")]) == 0
    page = (run_dir / "report.html").read_text()
    assert 'data-name="ensemble"' not in page and "Scores of b@224" in page
    assert "predictions.csv: members only" in page  # said, not silently left out
    # missed copy of b: Q2-R2 was never predicted (b never reaches precision 0.9: no P90 threshold)
    assert re.search(r"<b>Q2</b> → <b>R2</b><br>a@224 0\.700</div>", page)
    assert "Missed copies of b@224 (not predicted or below the P90 threshold; the worst 1 of 1)" in page
    assert "Is-copy threshold" not in page  # no predictions.csv: no decisions to count


def test_compare_scores_runs_side_by_side(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    rows = [("Q0", "R0", 0.9), ("Q3", "R3", 0.8), ("Q1", "R1", 0.7)]  # copies at ranks 1 and 3 -> μAP (1 + 2/3) / 3
    write_predictions(predictions(rows), other / "predictions.csv")
    assert main(["compare", str(run_dir), str(other), "--ground-truth", str(tmp_path / "gt.csv"),
                 "--meta", str(tmp_path / "meta.csv")]) == 0
    table = {line.split()[0]: line.split()[-2:] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert table["μAP"] == ["1.0000", f"{5 / 9:.4f}"]
    assert table["crop"] == ["1.0000", "1.0000"] and table["blur"] == ["1.0000", "0.0000"]
    assert main(["compare", str(run_dir), str(tmp_path / "nowhere")]) == 2


def test_compare_scores_each_run_against_its_own_ground_truth(run_dir, tmp_path, capsys):
    """A run of other images is not scored against the first run's ground truth (it got 0)."""
    other = tmp_path / "other"
    write_predictions(predictions([("X0", "Y0", 0.9), ("X1", "Y9", 0.8)]), other / "predictions.csv")
    (tmp_path / "gt-other.csv").write_text("query_id,reference_id\nX0,Y0\nX1,Y1\n")
    for run, gt in ((run_dir, "gt.csv"), (other, "gt-other.csv")):
        (run / "config.yaml").write_text(yaml.safe_dump({"models": [{"name": "resnet18"}],
                                                          "data": {"ground_truth": str(tmp_path / gt)}}))
    assert main(["compare", str(run_dir), str(other), "--meta", str(tmp_path / "meta.csv")]) == 0
    captured = capsys.readouterr()
    table = {line.split()[0]: line.split()[-2:] for line in captured.out.splitlines()[1:] if line.strip()}
    assert table["μAP"] == ["1.0000", "0.5000"] and "crop" not in table
    assert captured.out.splitlines()[-1].split() == ["GT", "pairs", "3", "2"]  # what each column was scored on
    assert "ground truths differ" in captured.err


def test_query_metadata_rows_of_one_query_add_up_and_a_file_naming_no_query_is_flagged(run_dir, tmp_path, caplog):
    from jobs.commands.report import read_families

    (tmp_path / "twice.csv").write_text("query_id,transforms\nQ0,flip\nQ0,crop;flip\n")
    assert read_families(str(tmp_path / "twice.csv")) == {"Q0": ["flip", "crop"]}
    (tmp_path / "other.csv").write_text("query_id,transforms\nX0,flip\n")
    assert main(["compare", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv"),
                 "--meta", str(tmp_path / "other.csv")]) == 0
    assert "names none of the ground truth's queries" in caplog.text


def test_family_figure_stays_readable_for_many_families_and_members(tmp_path):
    from ensemble.report.figures import family_heatmap

    def size(n_families: int, n_names: int) -> tuple[int, int]:
        recall = {f"family_{i}": {f"member_{j}": ((i + j) % 10 / 10, 3) for j in range(n_names)}
                  for i in range(n_families)}
        return Image.open(family_heatmap(recall, str(tmp_path / f"{n_families}x{n_names}.png"))).size

    w, h = size(30, 6)
    assert w <= 1000 and h <= 1200  # the grouped bars of this table were 7400 px wide
    assert size(30, 2)[0] < w and size(10, 6)[1] < h  # width follows members, height follows families


def test_compare_keeps_runs_with_one_folder_name_apart(run_dir, tmp_path, capsys):
    """Runs named alike (a/hard, b/hard) used to share one column of per-family recall."""
    for name, rows in (("a", [("Q0", "R0", 0.9), ("Q1", "R1", 0.8)]), ("b", [("Q0", "R9", 0.9), ("Q1", "R9", 0.8)])):
        write_predictions(predictions(rows), tmp_path / name / "hard" / "predictions.csv")
    assert main(["compare", str(tmp_path / "a" / "hard"), str(tmp_path / "b" / "hard"),
                 "--ground-truth", str(tmp_path / "gt.csv"), "--meta", str(tmp_path / "meta.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["a/hard", "b/hard"]
    table = {line.split()[0]: line.split()[-2:] for line in out[1:] if line.strip()}
    assert table["crop"] == ["1.0000", "0.0000"]


def test_report_refuses_a_run_whose_images_changed(run_dir, tmp_path, capsys):
    """Its thumbnails would show other pictures beside the old scores."""
    from core.settings import pin_settings
    from jobs.inputs import pin_inputs
    from jobs.layout import RunDir
    folders = {"query": str(tmp_path / "images"), "reference": str(tmp_path / "images")}
    pin_inputs(RunDir(str(run_dir)), folders)
    pin_settings(str(run_dir / "manifest.parquet"), {"folders": folders}, "manifest")
    assert main(["report", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv")]) == 0
    Image.new("RGB", (90, 60), (255, 0, 0)).save(tmp_path / "images" / "Q0.png")  # another picture under Q0
    capsys.readouterr()
    assert main(["report", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv")]) != 0
    assert re.search(r"input images changed .* changed \(.*Q0\.png", capsys.readouterr().err)


def test_compare_and_report_refuse_predictions_of_another_stage_than_the_config_ends_with(run_dir, tmp_path, capsys):
    """A verifying run whose predictions.csv was rewritten by `copydet fuse` (or stopped in
    between) holds fused scores: `evaluate` refused them, compare and report scored them."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"models": [{"name": "resnet18"}],
                                                         "verify": {"enabled": True}}))
    (run_dir / "predictions.json").write_text('{"scores": "fused"}')
    gt = ["--ground-truth", str(tmp_path / "gt.csv")]
    for argv in (["compare", str(run_dir), *gt], ["report", str(run_dir), *gt]):
        assert main(argv) == 2
        assert "holds the fused scores, but this config's predictions are the verified ones" in capsys.readouterr().err
    (run_dir / "predictions.json").write_text('{"scores": "verified"}')
    assert main(["compare", str(run_dir), *gt]) == 0


def test_report_shows_the_runs_is_copy_threshold(run_dir, tmp_path):
    config = {"models": [{"name": "resnet18"}], "data": {"ground_truth": str(tmp_path / "gt.csv")},
              "fuse": {"threshold": 0.8}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    # the ensemble's 0.95 and 0.9 are copies, 0.7 (a copy) falls below: precision 1, recall 2/3
    assert ("Is-copy threshold (fuse.threshold) 0.8000: 2 predictions at or above it (copies.csv), precision 1.0000, "
            "recall 0.6667") in page
    assert "Scores are on different scales from row to row." in page


def test_report_names_what_the_run_was_made_with(run_dir, tmp_path, caplog):
    gt = ["--ground-truth", str(tmp_path / "gt.csv")]
    record = {"started": "2026-12-07T01:00:00+00:00", "stages": ["manifest"], "packages": {
        "copydet": "0.1.0", "torch": "2.5.0", "timm": "1.0", "faiss-gpu": "1.9", "ray": "2.60.0"},
        "ray_cluster": {"nodes": 2, "CPU": 32.0, "GPU": 2.0, "accelerators": ["H100"]}}
    (run_dir / "environment.json").write_text(json.dumps([{**record, "stages": ["manifest"]}, record]))
    assert main(["report", str(run_dir), *gt]) == 0
    page = (run_dir / "report.html").read_text()
    assert ("made with copydet 0.1.0, torch 2.5.0, faiss-gpu 1.9, ray 2.60.0 on 2 node(s), 32 CPUs, 2 GPUs (H100), "
            "2026-12-07T01:00:00+00:00; 2 commands made this run (environment.json)") in page
    (run_dir / "environment.json").write_text("{not json")
    caplog.set_level(logging.WARNING)
    assert main(["report", str(run_dir), *gt]) == 0  # a damaged record list is named, not a failed report
    assert "environment.json: not JSON" in caplog.text and "made with" not in (run_dir / "report.html").read_text()


def test_report_checks_the_q_values_of_copies_csv_against_the_ground_truth(run_dir, tmp_path):
    (run_dir / "copies.csv").write_text("query_id,reference_id,score,q_value\n"
                                        "Q0,R0,0.95,0.01\nQ1,R1,0.9,0.01\nQ2,R2,0.7,0.2\nQ3,R3,0.6,0.25\n")
    assert main(["report", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv")]) == 0
    table = re.search(r'<table class="calibration">(.*?)</table>', (run_dir / "report.html").read_text()).group(1)
    rows = [re.findall(r"<td>([^<]*)</td>", r) for r in table.split("</tr>")[1:-1]]
    # cuts below the deepest q listed (0.3 is past it: pairs with q in (0.25, 0.3] may be unlisted), then that one
    assert rows == [["0.01", "2", "0.9900", "1.0000"], ["0.02", "2", "0.9800", "1.0000"],
                    ["0.05", "2", "0.9500", "1.0000"], ["0.1", "2", "0.9000", "1.0000"],
                    ["0.2", "3", "0.8000", "1.0000"], ["0.25", "4", "0.7500", "0.7500"]]
    (run_dir / "copies.csv").write_text("query_id,reference_id,score\nQ0,R0,0.95\n")  # a configured threshold's
    assert main(["report", str(run_dir), "--ground-truth", str(tmp_path / "gt.csv")]) == 0
    assert "calibration" not in (run_dir / "report.html").read_text()


def test_copies_are_read_as_written_ids_with_line_breaks_included(tmp_path):
    from jobs.commands.report import read_copies
    from jobs.layout import RunDir
    table = pa.table({"query_id": ["Q\n1", "Q2"], "reference_id": ["R,1", "R2"], "score": [0.9, 0.8],
                      "q_value": [0.01, None]})
    write_predictions(table, tmp_path / "copies.csv", ["q_value"])
    got = read_copies(RunDir(str(tmp_path)))
    assert got.column_names == ["query_id", "reference_id", "score", "q_value"]
    assert got.column("query_id").to_pylist() == ["Q\n1", "Q2"] and got.column("q_value").to_pylist() == [0.01, None]
    write_predictions(table, tmp_path / "copies.csv")  # a threshold not estimated: no q_value column
    assert read_copies(RunDir(str(tmp_path))).column_names == ["query_id", "reference_id", "score"]
