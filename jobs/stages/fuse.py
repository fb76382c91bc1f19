"""Stage 5: candidates of every model -> predictions.csv (image-level, top k per query).

The final predictions (this stage's, or verify's re-scored ones) are written by
:func:`write_final`: ``predictions.csv`` in the ISC21 format, and with ``fuse.threshold`` set
``copies.csv``, the same columns for the pairs scoring at or above it (the is-copy decisions).
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from core.metrics import write_predictions
from core.store import exists, filesystem, read_table, write_table
from ensemble.fuse import fuse, max_over_patches, top_k_per_query
from jobs.config import PipelineConfig
from jobs.layout import RunDir, shard_names

log = logging.getLogger(__name__)


def copies(preds: pa.Table, threshold: float) -> pa.Table:
    """The predictions whose score is at or above ``threshold``, best first."""
    kept = preds.filter(pc.greater_equal(preds.column("score"), pa.scalar(threshold, preds.schema.field("score").type)))
    return kept.take(pc.sort_indices(kept, [("score", "descending"), ("query_id", "ascending")]))


def write_final(preds: pa.Table, cfg: PipelineConfig, run: RunDir) -> None:
    """``predictions.csv``, and ``copies.csv`` when ``fuse.threshold`` is set (a stale one is removed)."""
    write_predictions(preds, run.predictions)
    if cfg.fuse.threshold is None:
        if exists(run.copies):
            fs, path = filesystem(run.copies)
            fs.delete_file(path)
        return
    found = copies(preds, cfg.fuse.threshold)
    write_predictions(found, run.copies)
    log.info(f"fuse: {found.num_rows} pair(s) at or above fuse.threshold {cfg.fuse.threshold:.4f} -> {run.copies}")


def run_fuse(cfg: PipelineConfig, run: RunDir) -> pa.Table:
    """Max over patch pairs per model, members calibrated onto one scale, then fused by the configured rule."""
    keys = cfg.search_keys()
    missing = [k for k in keys if not shard_names(run.candidates(k))]
    if missing:
        raise RuntimeError(f"fuse: no candidates for {missing} in {run.root}/candidates (run search first)")
    per_model = pa.concat_tables([max_over_patches(read_table(run.candidates(k))) for k in keys])
    preds = top_k_per_query(fuse(per_model, cfg.fuse.thresholds, cfg.fuse.rule, cfg.fuse.calibration), cfg.fuse.k)
    write_table(preds, run.fused)
    write_final(preds, cfg, run)
    log.info(f"fuse: {preds.num_rows} predictions for {len(set(preds.column('query_id').to_pylist()))} "
        f"queries -> {run.predictions}")
    return preds
