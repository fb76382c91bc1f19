"""Stage 6 (optional): keypoint verification of each query's best candidates.

Inlier counts are cached in ``verify.parquet/`` by (query, reference) pair, so a re-run only
verifies pairs it has not seen; the final score adds a bounded bonus for many inliers to
the fused score, and ``predictions.csv`` is rewritten from ``fused.parquet`` every time, so
running this stage twice never boosts a score twice.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from core.imageio import load_rgb
from core.store import chunks, join, list_shards, read_table, write_table
from ensemble.fuse import top_k_per_query
from ensemble.verify import verify_pairs
from jobs.config import PipelineConfig, VerifyConfig
from jobs.layout import RunDir, pin_settings
from jobs.stages.fuse import write_final
from jobs.runtime import run_tasks

log = logging.getLogger(__name__)

QUERIES_PER_TASK = 64


def verify_chunk(pairs: pa.Table, paths: dict[str, dict[str, str]], cfg: VerifyConfig, out: str) -> int:
    checked = verify_pairs(pairs, paths["query"], paths["reference"], top_k=cfg.top_k, method=cfg.method,
                           max_side=cfg.max_side, load=load_rgb)
    checked = checked.filter(pc.is_valid(checked.column("inliers")))
    write_table(checked.select(["query_id", "reference_id", "inliers"]), out)
    return checked.num_rows


def bonus(inliers: np.ndarray, cfg: VerifyConfig) -> np.ndarray:
    """0 below ``min_inliers``, rising linearly to ``weight`` at ``saturate`` inliers."""
    span = max(cfg.saturate - cfg.min_inliers, 1)
    return cfg.weight * np.clip((inliers - cfg.min_inliers) / span, 0.0, 1.0)


def rescore(fused: pa.Table, checked: pa.Table, cfg: VerifyConfig) -> pa.Table:
    joined = fused.join(checked, ["query_id", "reference_id"], join_type="left outer")
    inl = joined.column("inliers").to_numpy(zero_copy_only=False)
    inl = np.nan_to_num(np.asarray(inl, dtype=np.float64), nan=0.0)
    score = joined.column("score").to_numpy() + bonus(inl, cfg)
    return pa.table({"query_id": joined.column("query_id"), "reference_id": joined.column("reference_id"),
                     "score": pa.array(score.astype(np.float32))})


def run_verify(cfg: PipelineConfig, run: RunDir) -> None:
    if not cfg.verify.enabled:
        log.info("verify: off (set verify.enabled=true to verify candidates)")
        return
    pin_settings(run.verify, {"method": cfg.verify.method, "max_side": cfg.verify.max_side}, "verify")
    fused = read_table(run.fused)
    todo = top_k_per_query(fused, cfg.verify.top_k)
    if list_shards(run.verify):
        done = pa.concat_tables([read_table(s) for s in list_shards(run.verify)])
        seen = set(zip(done.column("query_id").to_pylist(), done.column("reference_id").to_pylist()))
        keep = [(q, r) not in seen for q, r in zip(todo.column("query_id").to_pylist(),
                                                     todo.column("reference_id").to_pylist())]
        todo = todo.filter(pa.array(keep, pa.bool_()))
    manifest = read_table(run.manifest, columns=["image_id", "path", "split"])
    paths: dict[str, dict[str, str]] = {"query": {}, "reference": {}}
    for i, p, s in zip(*(manifest.column(c).to_pylist() for c in ("image_id", "path", "split"))):
        if s in paths:
            paths[s][i] = p
    paths_ref = ray.put(paths)  # one copy in the object store for every task
    queries = sorted(set(todo.column("query_id").to_pylist()))
    start = len(list_shards(run.verify))
    calls = []
    for i, a, b in chunks(len(queries), QUERIES_PER_TASK):
        part = todo.filter(pc.is_in(todo.column("query_id"), pa.array(queries[a:b])))
        calls.append((part, paths_ref, cfg.verify, join(run.verify, f"part-{start + i:05d}.parquet")))
    run_tasks(verify_chunk, calls, "verify")
    checked = pa.concat_tables([read_table(s) for s in list_shards(run.verify)])
    preds = rescore(fused, checked, cfg.verify)
    write_final(preds, cfg, run)
    log.info(f"verify: {checked.num_rows} pairs checked ({cfg.verify.method}); "
        f"{int(pc.sum(pc.greater_equal(checked.column('inliers'), cfg.verify.min_inliers)).as_py() or 0)} "
        f"with >= {cfg.verify.min_inliers} inliers -> {run.predictions}")
