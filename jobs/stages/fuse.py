"""Stage 5: candidates of every model -> predictions.csv (image-level, top k per query).

``fused.parquet`` keeps the fused scores. The final predictions (this stage's, or verify's
re-scored ones, each query's candidates below its best lowered by ``fuse.demote_others``: :func:`finish`)
are written by :func:`write_final`: ``predictions.csv`` in the ISC21 format, and with an is-copy threshold
``copies.csv``, the same columns for the pairs scoring at or above it (the is-copy decisions).
With ``fuse.threshold: auto`` the train decoys are fused the same way (``fused_decoys.parquet``)
and the threshold estimated from them (:mod:`jobs.threshold`); copies.csv then adds each pair's
``q_value``: the estimated false share of the copies scoring at least as high.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from core.metrics import write_predictions
from core.store import exists, join, read_table, read_text, remove_file, write_table, write_text
from ensemble.fuse import demote_others, fuse, max_over_patches, top_k_per_query
from jobs.completeness import IncompleteUpstream, require_candidates
from jobs.config import PipelineConfig
from jobs.layout import RunDir, shard_names
from jobs.threshold import estimate

log = logging.getLogger(__name__)


def copies(preds: pa.Table, threshold: float) -> pa.Table:
    """The predictions whose score is at or above ``threshold``, best first."""
    kept = preds.filter(pc.greater_equal(preds.column("score"), pa.scalar(threshold, preds.schema.field("score").type)))
    return kept.take(pc.sort_indices(kept, [("score", "descending"), ("query_id", "ascending")]))


def write_final(preds: pa.Table, threshold: float | None, run: RunDir, q: np.ndarray | None = None) -> None:
    """``predictions.csv``, and ``copies.csv`` when there is a threshold (a stale one is removed);
    with ``q`` (each prediction's q-value, from the decoys) copies.csv has a ``q_value`` column."""
    write_predictions(preds, run.predictions)
    if threshold is None:
        remove_file(run.copies)
        return
    found = copies(preds if q is None else preds.append_column("q_value", pa.array(q, pa.float64())), threshold)
    write_predictions(found, run.copies, extra=["q_value"] if q is not None else [])
    log.info(f"fuse: {found.num_rows} pair(s) at or above the is-copy threshold {threshold:.4f} -> {run.copies}")


def finish(scores: pa.Table, decoys: pa.Table | None, cfg: PipelineConfig, run: RunDir, kind: str) -> None:
    """The final predictions from ``scores`` (``kind``: fused or verified), each query's candidates
    below its best lowered by ``fuse.demote_others``, and :func:`write_final` them. With ``decoys``
    (scored alike) the threshold is estimated from them, each lowered below its query's best
    prediction as a non-copy reference in that query's list would be."""
    share = cfg.fuse.demote_others
    final = demote_others(scores, share)
    q = None
    if decoys is None:
        threshold = cfg.fuse.threshold
        remove_file(run.threshold)  # an estimate of an earlier `auto` run: not this config's threshold
    else:
        threshold, q = estimate(final, demote_others(decoys, share, scores), cfg, run, kind)
    write_final(final, threshold, run, q)
    write_text(run.scores, json.dumps({"scores": kind}))  # after the predictions: never names newer ones


def final_kind(cfg: PipelineConfig) -> str:
    """The scores a finished run's predictions hold under ``cfg``."""
    return "verified" if cfg.verify.enabled else "fused"


def require_final(cfg: PipelineConfig, run: RunDir) -> None:
    """Refuse predictions of another stage than ``cfg``'s last (e.g. ``copydet fuse`` run again
    after ``verify``): scoring them would report the wrong stage's figures."""
    if not exists(run.scores):
        return  # a run folder from before the record
    made, want = json.loads(read_text(run.scores))["scores"], final_kind(cfg)
    if made != want:
        stage = "verify" if want == "verified" else "fuse"
        raise IncompleteUpstream(f"{run.predictions} holds the {made} scores, but this config's predictions are "
                                 f"the {want} ones: run `copydet {stage} --out {run.root}` first")


def query_shards(run: RunDir, keys: list[str], folder: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """Candidate files of every key, grouped by the patch shard they come from.

    A patch shard holds whole images, so one group holds every candidate of its queries from
    every model: the unit that fusion can finish alone (``query-00002-0003.parquet`` belongs to
    ``query-00002``).
    """
    folder = folder or run.candidates
    groups: dict[str, list[str]] = {}
    for key in keys:
        for name in shard_names(folder(key)):
            groups.setdefault(name.removesuffix(".parquet").rsplit("-", 1)[0], []).append(join(folder(key), name))
    return dict(sorted(groups.items()))


def fuse_group(files: list[str], cfg: PipelineConfig) -> pa.Table:
    """Top-k image-level predictions of one group of candidate files."""
    per_model = pa.concat_tables([max_over_patches(read_table(f)) for f in files])
    return top_k_per_query(fuse(per_model, cfg.fuse.thresholds, cfg.fuse.rule, cfg.fuse.calibration), cfg.fuse.k)


def fuse_all(cfg: PipelineConfig, run: RunDir, folder: Callable[[str], str], desc: str) -> pa.Table:
    """Image-level top k of every query from every key's files in ``folder(key)``; one patch shard
    at a time, so the driver holds one shard's candidates and the (small) image-level top k."""
    groups = query_shards(run, cfg.search_keys(), folder)
    parts = [fuse_group(files, cfg) for files in tqdm(groups.values(), desc=desc, unit="shard")]
    preds = pa.concat_tables(parts).combine_chunks()
    return preds.take(pc.sort_indices(preds, [("query_id", "ascending"), ("score", "descending")]))


def run_fuse(cfg: PipelineConfig, run: RunDir) -> pa.Table:
    """Max over patch pairs per model, members calibrated onto one scale, then fused by the
    configured rule (and the decoys likewise, for ``fuse.threshold: auto``)."""
    require_candidates(cfg, run, "fuse")
    preds = fuse_all(cfg, run, run.candidates, "fuse")
    write_table(preds, run.fused)
    decoys = None
    if cfg.decoys():
        decoys = fuse_all(cfg, run, run.decoys, "fuse decoys")
        write_table(decoys, run.fused_decoys)
    finish(preds, decoys, cfg, run, "fused")
    log.info(f"fuse: {preds.num_rows} predictions for {pc.count_distinct(preds.column('query_id')).as_py()} "
             f"queries -> {run.predictions}")
    return preds
