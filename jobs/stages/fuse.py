"""Stage 5: candidates of every model -> predictions.csv (image-level, top k per query)."""
from __future__ import annotations

import logging

import pyarrow as pa

from core.metrics import write_predictions
from core.store import read_table, write_table
from ensemble.fuse import fuse, max_over_patches, top_k_per_query
from jobs.completeness import require_candidates
from jobs.config import PipelineConfig
from jobs.layout import RunDir

log = logging.getLogger(__name__)


def run_fuse(cfg: PipelineConfig, run: RunDir) -> pa.Table:
    """Max over patch pairs per model, then across models by the configured rule."""
    keys = cfg.search_keys()
    require_candidates(cfg, run, "fuse")
    per_model = pa.concat_tables([max_over_patches(read_table(run.candidates(k))) for k in keys])
    preds = top_k_per_query(fuse(per_model, cfg.fuse.thresholds, cfg.fuse.rule), cfg.fuse.k)
    write_table(preds, run.fused)
    write_predictions(preds, run.predictions)
    log.info(f"fuse: {preds.num_rows} predictions for {len(set(preds.column('query_id').to_pylist()))} "
        f"queries -> {run.predictions}")
    return preds
