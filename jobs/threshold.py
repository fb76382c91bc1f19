"""The run's is-copy threshold: ``fuse.threshold`` as configured, or with ``auto`` estimated from
the run's decoys (:mod:`ensemble.decoys`) and recorded in ``threshold.json``."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.metrics import written
from core.store import exists, read_table, read_text, write_text
from ensemble.decoys import estimate_threshold, fold_factor, q_curve, q_values
from jobs.config import PipelineConfig
from jobs.layout import RunDir

log = logging.getLogger(__name__)
POINT = re.compile(r"\[\s+([^\s,\]]+),\s+([^\s,\]]+)\s+\]")  # a q_curve point, written on one line


def reference_ratio(run: RunDir) -> float:
    """References / train images of the run (the decoys stand in for that many references)."""
    splits = read_table(run.manifest, ["split"]).column("split")
    n_ref, n_train = (pc.sum(pc.equal(splits, s)).as_py() or 0 for s in ("reference", "train"))
    if not n_ref or not n_train:
        raise ValueError(f"{run.manifest}: fuse.threshold auto needs references and train images, "
                         f"found {n_ref} and {n_train}")
    return n_ref / n_train


def estimate(preds: pa.Table, decoys: pa.Table, cfg: PipelineConfig, run: RunDir,
             scores: str) -> tuple[float | None, np.ndarray]:
    """Estimate the threshold of ``fuse.threshold_precision`` from ``decoys`` (predictions of the
    train photos, scored as ``preds`` were) and write ``threshold.json``; returns the threshold and
    each prediction's q-value (:func:`ensemble.decoys.q_values`)."""
    per_train = reference_ratio(run)
    real, fake = preds.column("score").to_numpy(), decoys.column("score").to_numpy()
    ratio = per_train * fold_factor(cfg.fuse.decoy_folds)
    q = q_values(real, fake, ratio)
    est = estimate_threshold(real, fake, ratio, cfg.fuse.threshold_precision, q)
    if est.threshold is not None:  # one prediction's score, as predictions.csv and copies.csv write it
        est = replace(est, threshold=written(est.threshold))
    curve = [(written(s), level) for s, level in q_curve(real, q)]  # scores as the CSVs and the service give them
    record = {**asdict(est), "scores": scores, "references_per_train": per_train, "folds": cfg.fuse.decoy_folds,
              "predictions": preds.num_rows, "decoy_predictions": decoys.num_rows, "q_curve": curve}
    write_text(run.threshold, POINT.sub(r"[\1, \2]", json.dumps(record, indent=2)))
    if est.threshold is None:
        log.info(f"threshold: no score of the {scores} predictions reaches an estimated precision of "
                 f"{est.target:g}; no copies.csv ({run.threshold})")
    else:
        log.info(f"threshold: {est.threshold:.4f} on {scores} scores: {est.pairs} pair(s) at or above it, "
                 f"{est.decoys} decoy(s) x {est.ratio:.3f} -> estimated precision {est.precision:.3f} "
                 f"(target {est.target:g}) ({run.threshold})")
    return est.threshold, q


def recorded(run: RunDir) -> dict:
    """The run's ``threshold.json`` (empty before an estimate was written)."""
    return json.loads(read_text(run.threshold)) if exists(run.threshold) else {}


def threshold_of(cfg: PipelineConfig, run: RunDir) -> float | None:
    """The threshold copies.csv and the metrics use: the configured number, or the estimate."""
    return recorded(run).get("threshold") if cfg.decoys() else cfg.fuse.threshold
