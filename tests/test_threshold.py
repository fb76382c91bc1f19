"""The is-copy threshold: copies.csv beside predictions.csv, and its precision / recall when evaluated."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from core.metrics import at_threshold, evaluate, read_ground_truth, read_predictions, write_predictions
from jobs.layout import RunDir
from jobs.stages.evaluate import evaluate_run_files, format_metrics
from jobs.stages.fuse import write_final

# scores high to low: T F T T F  (GT has 4 pairs: one never predicted)
PRED = [("q0", "r0", 0.9), ("q1", "r5", 0.8), ("q1", "r1", 0.7), ("q2", "r2", 0.7), ("q3", "r3", 0.2)]
GT = [("q0", "r0"), ("q1", "r1"), ("q2", "r2"), ("q4", "r4")]


def table(rows):
    return pa.table({"query_id": [r[0] for r in rows], "reference_id": [r[1] for r in rows],
                     "score": pa.array([r[2] for r in rows], pa.float32())})


def test_precision_and_recall_at_a_threshold():
    m = evaluate(GT, *(np.array([r[i] for r in PRED], dtype=object if i < 2 else float) for i in range(3)))
    assert at_threshold(m, 0.75) == {"threshold": 0.75, "copies_at_threshold": 2, "precision_at_threshold": 0.5,
                                     "recall_at_threshold": 0.25}
    # ties at the threshold are all in: 0.7 keeps four pairs, three of them copies
    assert at_threshold(m, 0.7)["copies_at_threshold"] == 4
    assert at_threshold(m, 0.7)["precision_at_threshold"] == pytest.approx(0.75)
    assert at_threshold(m, 0.95) == {"threshold": 0.95, "copies_at_threshold": 0, "precision_at_threshold": None,
                                     "recall_at_threshold": 0.0}
    assert "at fuse.threshold 0.7000: 4 copies, precision 0.7500, recall 0.7500" in format_metrics(m, 0.7)


def test_copies_csv_follows_the_threshold_and_is_removed_without_one(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    write_final(table(PRED), 0.7, run)
    assert read_predictions(run.predictions).num_rows == 5  # the ISC21 file keeps every prediction
    found = read_predictions(run.copies)
    assert found.column("score").to_pylist() == pytest.approx([0.9, 0.8, 0.7, 0.7])
    write_final(table(PRED), None, run)
    assert not (tmp_path / "run" / "copies.csv").exists()  # no stale decisions from an older threshold
    from jobs.config import load_config
    from jobs.stages.fuse import finish
    (tmp_path / "run" / "threshold.json").write_text('{"threshold": 0.2}')  # left by an `auto` run
    finish(table(PRED), None, load_config(None, ["fuse.threshold=0.75"]), run, "fused")
    assert not os.path.exists(run.threshold) and read_predictions(run.copies).num_rows == 2

    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in GT))
    write_predictions(table(PRED), run.predictions)
    evaluate_run_files(run.predictions, read_ground_truth(gt), run.metrics, threshold=0.7)
    saved = json.loads(open(run.metrics).read())
    assert saved["threshold"] == 0.7 and saved["precision_at_threshold"] == pytest.approx(0.75)


def test_every_score_as_the_threshold_counts_the_pairs_copies_csv_holds(tmp_path):
    """An estimated threshold is one prediction's float32 score; read back from predictions.csv
    (float64 of its text), that pair must still be at the threshold, in the table and in the file."""
    from jobs.stages.fuse import copies
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 0.01, 200).astype(np.float32)
    preds = pa.table({"query_id": [f"q{i}" for i in range(200)], "reference_id": [f"r{i % 7}" for i in range(200)],
                      "score": pa.array(scores, pa.float32())})
    gt = [(f"q{i}", f"r{i % 7}") for i in range(0, 200, 3)]
    run = RunDir(str(tmp_path / "run"))
    for t in map(float, scores[:50]):
        write_final(preds, t, run)
        counted = [evaluate_run_files(p, gt, run.metrics, threshold=t) and json.loads(open(run.metrics).read())
                   for p in (run.predictions, preds)]
        assert [c["copies_at_threshold"] for c in counted] == [copies(preds, t).num_rows] * 2
        assert read_predictions(run.copies).num_rows == copies(preds, t).num_rows
