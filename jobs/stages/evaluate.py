"""Stage 6: predictions.csv + ground truth -> metrics.json and pr_curve.png."""
from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from core.metrics import Metrics, at_threshold, evaluate_table, plot_pr, read_predictions
from core.store import write_text


def evaluate_run_files(predictions: str | pa.Table, ground_truth: Sequence[tuple[str, str]],
                       metrics_json: str | None = None, pr_png: str | None = None, label: str = "copydet",
                       threshold: float | None = None) -> Metrics:
    """Score a predictions CSV (or its table) against ground-truth pairs and optionally save the
    metrics JSON (with the operating point of ``threshold`` when given) and the PR-curve PNG."""
    preds = read_predictions(predictions) if isinstance(predictions, str) else predictions
    m = evaluate_table(ground_truth, preds)
    if metrics_json:
        extra = at_threshold(m, threshold) if threshold is not None else {}
        write_text(metrics_json, json.dumps({**m.summary(), **extra}, indent=2))
    if pr_png:
        plot_pr({label: m}, pr_png)
    return m


def format_metrics(m: Metrics, threshold: float | None = None, source: str = "fuse.threshold") -> str:
    """One line of metrics; with ``threshold`` (named by ``source``), its copies, precision and recall."""
    s = m.summary()
    line = (f"μAP {s['micro_ap']:.4f} | R@P90 {s['recall_at_p90']:.4f} | "
            f"R@1 {s['recall_at_1']:.4f} | R@10 {s['recall_at_10']:.4f}")
    if threshold is not None:
        t = at_threshold(m, threshold)
        p = "n/a" if t["precision_at_threshold"] is None else f"{t['precision_at_threshold']:.4f}"
        line += (f" | at {source} {threshold:.4f}: {t['copies_at_threshold']} copies, precision {p}, "
                 f"recall {t['recall_at_threshold']:.4f}")
    return line
