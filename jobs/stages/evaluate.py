"""Stage 6: predictions.csv + ground truth -> metrics.json and pr_curve.png."""
from __future__ import annotations

import json

from core.metrics import Metrics, evaluate_files, plot_pr
from core.store import write_text


def evaluate_run_files(predictions: str, ground_truth: str, metrics_json: str | None = None,
                       pr_png: str | None = None, label: str = "copydet") -> Metrics:
    """Score a predictions CSV and optionally save the metrics JSON and the PR-curve PNG."""
    m = evaluate_files(ground_truth, predictions)
    if metrics_json:
        write_text(metrics_json, json.dumps(m.summary(), indent=2))
    if pr_png:
        plot_pr({label: m}, pr_png)
    return m


def format_metrics(m: Metrics) -> str:
    s = m.summary()
    return (f"μAP {s['micro_ap']:.4f} | R@P90 {s['recall_at_p90']:.4f} | "
            f"R@1 {s['recall_at_1']:.4f} | R@10 {s['recall_at_10']:.4f}")
