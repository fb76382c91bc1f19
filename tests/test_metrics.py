"""ISC21 metrics: hand-computed cases, a loop-based reference on random data, CSV I/O, PR plot."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from core import metrics
from core.contracts import PREDICTIONS_SCHEMA
from core.metrics import (
    Metrics,
    evaluate,
    evaluate_table,
    plot_pr,
    read_ground_truth,
    read_predictions,
    write_predictions,
)


def run(gt, preds) -> Metrics:
    q, r, s = zip(*preds) if preds else ((), (), ())
    return evaluate(gt, list(q), list(r), np.array(s, dtype=float))


def test_perfect_ranking():
    gt = [("q1", "r1"), ("q2", "r2")]
    # order T, T, F: p = 1, 1, 2/3; r = .5, 1, 1 -> μAP = .5*1 + .5*1 + 0*2/3 = 1
    m = run(gt, [("q1", "r1", 0.9), ("q2", "r2", 0.8), ("q1", "r5", 0.1)])
    assert m.micro_ap == pytest.approx(1.0)
    assert m.recall_at_p90 == pytest.approx(1.0) and m.threshold_at_p90 == pytest.approx(0.8)
    assert (m.recall_at_1, m.recall_at_10) == (1.0, 1.0)
    assert (m.n_predictions, m.n_positives) == (3, 2)
    np.testing.assert_allclose(m.precisions, [1, 1, 2 / 3])
    np.testing.assert_allclose(m.thresholds, [0.9, 0.8, 0.1])


def test_false_positive_on_top_never_reaches_p90():
    gt = [("q1", "r1"), ("q2", "r2")]
    # order F, T, T: p = 0, 1/2, 2/3; r = 0, .5, 1 -> μAP = .5*.5 + .5*2/3 = 7/12
    m = run(gt, [("q1", "rx", 0.9), ("q1", "r1", 0.8), ("q2", "r2", 0.7)])
    assert m.micro_ap == pytest.approx(7 / 12)
    # max precision is 2/3 < 0.9
    assert m.recall_at_p90 == 0.0 and m.threshold_at_p90 is None
    # q1's true match has rank (2 scores >= 0.8) - 1 = 1; q2's has rank 0
    assert (m.recall_at_1, m.recall_at_10) == (0.5, 1.0)
    assert m.summary()["threshold_at_p90"] is None


@pytest.mark.parametrize("flip", [False, True])
def test_ties_are_pessimistic(flip):
    preds = [("q1", "r1", 0.5), ("q1", "rx", 0.5)]
    # equal scores: false first -> p = 0, 1/2; r = 0, 1 -> μAP = 1 * 1/2; rank of r1 = 2 - 1 = 1
    m = run([("q1", "r1")], preds[::-1] if flip else preds)
    assert m.micro_ap == pytest.approx(0.5)
    assert m.recall_at_1 == 0.0 and m.recall_at_10 == 1.0
    assert m.recall_at_p90 == 0.0


def test_gt_query_without_predictions_lowers_recall():
    gt = [("q1", "r1"), ("q2", "r2")]
    # one TP of two positives: p = 1, r = .5 -> μAP = .5; P90 reached at recall .5, score .9
    m = run(gt, [("q1", "r1", 0.9)])
    assert m.micro_ap == pytest.approx(0.5)
    assert m.recall_at_p90 == pytest.approx(0.5) and m.threshold_at_p90 == pytest.approx(0.9)
    assert (m.recall_at_1, m.recall_at_10) == (0.5, 0.5)


def test_recall_at_1_vs_10():
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3")]
    preds = [("q2", "r2", 0.95), ("q1", "ra", 0.9), ("q1", "rb", 0.8), ("q1", "rc", 0.7), ("q1", "r1", 0.6)]
    # q3: true match at 0-based rank 10 -> outside the top 10
    preds += [("q3", f"x{i}", 0.5 - i / 100) for i in range(10)] + [("q3", "r3", 0.3)]
    m = run(gt, preds)
    # ranks: q1 -> 3, q2 -> 0, q3 -> 10
    assert m.recall_at_1 == pytest.approx(1 / 3) and m.recall_at_10 == pytest.approx(2 / 3)
    # order T F F F T F*10 T: p_i at TPs 1, 2/5, 3/16; r steps 1/3 each -> μAP = (1 + .4 + 3/16) / 3
    assert m.micro_ap == pytest.approx((1 + 0.4 + 3 / 16) / 3)
    assert m.recall_at_p90 == pytest.approx(1 / 3) and m.threshold_at_p90 == pytest.approx(0.95)


def test_duplicates_rejected():
    with pytest.raises(ValueError, match="duplicates.*'q1', 'r1'"):
        run([("q1", "r1")], [("q1", "r1", 0.9), ("q2", "r1", 0.5), ("q1", "r1", 0.3)])


@pytest.mark.parametrize("rows, words", [
    ("q1,r1,0.9\nq2,r2,inf\n", "line 3 (q2, r2): score inf"),
    ("q1,r1,nan\n", "line 2 (q1, r1): score is empty or NaN"),
    ("q1,r1,0.9\nq2,r2,\n", "line 3 (q2, r2): score is empty or NaN"),
    ("q1,r1,0.9\nq2,r1,0.5\nq1,r1,0.3\n", "1 (query, reference) pair(s) appear more than once, e.g. (q1, r1)"),
])
def test_a_predictions_file_that_no_metric_can_trust_is_refused_naming_it(tmp_path, rows, words):
    path = tmp_path / "preds.csv"
    path.write_text("query_id,reference_id,score\n" + rows)
    with pytest.raises(ValueError) as err:
        read_predictions(path)
    assert str(err.value).startswith(f"{path}: {words}")
    with pytest.raises(ValueError, match="NaN or infinite"):
        run([("q1", "r1")], [("q1", "r1", float("inf"))])


def test_no_predictions():
    m = run([("q1", "r1")], [])
    assert (m.micro_ap, m.recall_at_p90, m.recall_at_1, m.n_predictions) == (0.0, 0.0, 0.0, 0)


def slow_reference(gt, preds) -> dict:
    """Loop-based ISC21 metrics, written for clarity, not speed."""
    gt_set = set(gt)
    ranked = sorted(preds, key=lambda p: (-p[2], (p[0], p[1]) in gt_set))
    ntp, ap, prev_r, best = 0, 0.0, 0.0, (0.0, None)
    for i, (q, r, s) in enumerate(ranked):
        ntp += (q, r) in gt_set
        prec, rec = ntp / (i + 1), ntp / len(gt)
        ap += (rec - prev_r) * prec
        prev_r = rec
        if prec >= 0.9 and (best[1] is None or rec > best[0]):
            best = (rec, s)
    ranks = []
    for q, r in gt:
        mine = [p for p in preds if p[0] == q]
        true = [p[2] for p in mine if p[1] == r]
        ranks.append(sum(p[2] >= true[0] for p in mine) - 1 if true else 10**9)
    return dict(micro_ap=ap, recall_at_p90=best[0], threshold_at_p90=best[1],
                recall_at_1=sum(k == 0 for k in ranks) / len(gt),
                recall_at_10=sum(k < 10 for k in ranks) / len(gt))


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    queries, refs = [f"Q{i}" for i in range(25)], [f"R{i}" for i in range(40)]
    gt = sorted({(queries[i], refs[j]) for i, j in zip(rng.integers(0, 25, 20), rng.integers(0, 40, 20))})
    pairs = {(queries[i], refs[j]) for i, j in zip(rng.integers(0, 25, 260), rng.integers(0, 40, 260))}
    pairs = sorted(pairs | set(gt[: len(gt) * 3 // 4]))[:200]  # some GT pairs stay unpredicted
    # scores on a coarse grid (many ties); true pairs score higher; P90 is reached for some seeds
    scores = [round(float(rng.uniform(0.4, 1) if p in gt else rng.beta(1, 1 + 4 * (seed % 3))), 1)
              for p in pairs]
    preds = [(q, r, s) for (q, r), s in zip(pairs, scores)]
    perm = rng.permutation(len(preds))
    got = run(gt, [preds[i] for i in perm]).summary()
    want = slow_reference(gt, preds)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_prediction_csv_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "WRITE_ROWS", 2)  # written in slices: the rows of each, in order
    table = pa.table({"query_id": ["Q1", "Q1", "Q2"], "reference_id": ["R9", "R3", "R3"],
                      "score": pa.array([0.1, -2.5, 0.123456789], pa.float32()), "q_value": [0.5, None, 0.25]})
    path = write_predictions(table, tmp_path / "out" / "predictions.csv")
    assert open(path).read().splitlines() == ["query_id,reference_id,score", "Q1,R9,0.1",
                                             "Q1,R3,-2.5", "Q2,R3,0.12345679"]
    assert read_predictions(path).cast(PREDICTIONS_SCHEMA).equals(table.drop(["q_value"]))  # float32's shortest text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["predictions.csv"]  # no temp left
    with_extra = write_predictions(table, tmp_path / "copies.csv", ["q_value"])
    assert open(with_extra).read().splitlines() == ["query_id,reference_id,score,q_value", "Q1,R9,0.1,0.5",
                                                   "Q1,R3,-2.5,", "Q2,R3,0.12345679,0.25"]
    shards = write_predictions(iter([table.slice(0, 1), table.slice(1, 0), table.slice(1)]), tmp_path / "s.csv",
                               ["q_value"])  # tables one after another (shards read one at a time)
    assert open(shards).read() == open(with_extra).read()


def test_ids_with_commas_quotes_and_line_breaks_round_trip(tmp_path):
    odd = ['Q,1', 'Q "2"', 'Q\n3']
    table = pa.table({"query_id": odd, "reference_id": ["R1", 'R,"x"', "R3"],
                      "score": pa.array([0.5, 0.25, 0.125], pa.float32())})
    path = write_predictions(table, tmp_path / "p.csv")
    assert open(path).read().startswith('query_id,reference_id,score\n"Q,1",R1,0.5\n"Q ""2""","R,""x""",0.25\n')
    assert read_predictions(path).cast(PREDICTIONS_SCHEMA).equals(table)
    gt = tmp_path / "gt.csv"
    gt.write_text('query_id,reference_id\n"Q,1",R1\n"Q\n3",R3\n')
    assert read_ground_truth(gt) == [("Q,1", "R1"), ("Q\n3", "R3")]
    assert evaluate_table(read_ground_truth(gt), read_predictions(path)).recall_at_1 == 1.0


def test_a_repeated_ground_truth_pair_is_refused(tmp_path):
    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\nQ1,R1\nQ2,R2\nQ1,R1\n")
    with pytest.raises(ValueError, match=r"gt\.csv: 1 \(query_id, reference_id\) pair\(s\) listed more than once: "
                                         r"\('Q1', 'R1'\)"):
        read_ground_truth(gt)


def test_ground_truth_csv_and_predictions_csv_scored(tmp_path):
    gt_csv = tmp_path / "gt.csv"
    gt_csv.write_text("query_id,reference_id\nQ1,R1\nQ2,\nQ3,R3\n")
    assert read_ground_truth(gt_csv) == [("Q1", "R1"), ("Q3", "R3")]
    preds = write_predictions(pa.table({"query_id": ["Q1", "Q3"], "reference_id": ["R1", "R0"],
                                        "score": [0.9, 0.8]}), tmp_path / "p.csv")
    m = evaluate_table(read_ground_truth(gt_csv), read_predictions(preds))
    assert m.micro_ap == pytest.approx(0.5) and m.recall_at_1 == 0.5  # Q1 found, Q3 wrong


def test_scores_are_ranked_as_written_not_as_float32(tmp_path):
    """As float32 both scores are 20.0: a tie, which ranks the false pair first (the ISC21 reader keeps them)."""
    path = tmp_path / "p.csv"
    path.write_text("query_id,reference_id,score\nQ1,R1,20.000002\nQ1,R2,20.000001\n")
    m = evaluate_table([("Q1", "R1")], read_predictions(path))
    assert (m.micro_ap, m.recall_at_p90, m.recall_at_1) == (1.0, 1.0, 1.0)


def test_one_score_as_written_is_the_columns_text():
    """The service writes one score at a time (numpy's text), the CSV a column (Arrow's): the same numbers."""
    from core.metrics import as_written, written
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 3000), rng.normal(0, 1e-4, 3000), rng.uniform(-50, 50, 3000)]).astype(np.float32)
    assert as_written(pa.array(x)).tolist() == [written(v) for v in x.tolist()]
    assert written(0.7) == 0.7 and written(float(np.float32(0.7))) == 0.7


def test_the_header_line_is_optional_as_in_isc21(tmp_path):
    gt, preds = tmp_path / "gt.csv", tmp_path / "p.csv"
    gt.write_text("\ufeffQ1,R1\nQ2,\nQ3,R3\n")  # a BOM too, as a spreadsheet writes it
    preds.write_text("Q1,R1,0.9\nQ3,R0,0.8\n")
    assert read_ground_truth(gt) == [("Q1", "R1"), ("Q3", "R3")]
    assert read_predictions(preds).column("reference_id").to_pylist() == ["R1", "R0"]
    preds.write_text("Q1,R1\n")
    with pytest.raises(ValueError, match=r"p\.csv: no header line, and 2 column\(s\) where "
                                         r"query_id,reference_id,score are expected"):
        read_predictions(preds)


def test_ids_with_spaces_around_them_are_kept_and_named(tmp_path, caplog):
    """``Q1, R1`` names reference `` R1``: kept as written (a file may be named so), with a warning
    naming the file, the column and an example, instead of a silent μAP of 0."""
    caplog.set_level(logging.WARNING)
    preds = tmp_path / "p.csv"
    preds.write_text("Q1, R1, 0.9\nQ3,R0,0.8\n")
    assert read_predictions(preds).column("reference_id").to_pylist() == [" R1", "R0"]
    assert caplog.messages == [f"{preds}: 1 reference_id value(s) have spaces around them (e.g. ' R1'); ids are "
                               "matched as written: write the CSV without spaces after the commas"]
    caplog.clear()
    preds.write_text("Q1,R1,0.9\nQ3,R0,0.8\n")
    read_predictions(preds)
    assert caplog.messages == []


def test_missing_columns_named(tmp_path):
    bad = tmp_path / "gt.csv"
    bad.write_text("query,reference_id\nQ1,R1\n")
    with pytest.raises(ValueError, match=r"gt\.csv.*missing column.*query_id"):
        read_ground_truth(bad)


def test_plot_pr_writes_png(tmp_path):
    a = run([("q1", "r1"), ("q2", "r2")], [("q1", "r1", 0.9), ("q2", "rx", 0.8), ("q2", "r2", 0.7)])
    b = run([("q1", "r1"), ("q2", "r2")], [("q1", "r1", 0.9)])
    path = plot_pr({"a": a, "b": b}, tmp_path / "pr.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
