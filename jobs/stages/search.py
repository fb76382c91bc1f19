"""Stage 4: features -> candidates/<model>@<scale>/<query shard>.parquet (faiss kNN).

Reference (and, for score normalisation, train) descriptors go into Ray's object store
once; each query shard is a task that searches them and writes its candidates.
"""
from __future__ import annotations

import pyarrow as pa
import ray

from ensemble.normalize import bias_table, normalize_scores
from ensemble.search import search_tables
from ensemble.store import embeddings_from_arrow, join, read_table, write_table
from jobs.config import PipelineConfig, SearchConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import run_tasks, say


def read_split(run: RunDir, key: str, split: str) -> pa.Table | None:
    """Every feature row of one split for one model key (None when there are none)."""
    names = shard_names(run.features(key), split)
    if not names:
        return None
    return pa.concat_tables([read_table(join(run.features(key), n)) for n in names])


def search_shard(run: RunDir, key: str, name: str, refs: pa.Table, train: pa.Table | None,
                 cfg: SearchConfig) -> int:
    queries = read_table(join(run.features(key), name))
    cands = search_tables(queries, refs, cfg.k, model=key)
    if train is not None and cfg.normalize.enabled:
        bias = bias_table(queries, embeddings_from_arrow(train.column("embedding")), cfg.normalize.neighbours)
        cands = normalize_scores(cands, bias, cfg.normalize.beta)
    write_table(cands, join(run.candidates(key), name))
    return cands.num_rows


def run_search(cfg: PipelineConfig, run: RunDir) -> None:
    for _, _, key in cfg.model_keys():
        done = set(shard_names(run.candidates(key)))
        todo = [n for n in shard_names(run.features(key), "query") if n not in done]
        if not todo:
            continue
        refs = read_split(run, key, "reference")
        if refs is None:
            raise RuntimeError(f"search {key}: no reference features in {run.features(key)}")
        train = read_split(run, key, "train") if cfg.search.normalize.enabled else None
        if cfg.search.normalize.enabled and train is None:
            say(f"search {key}: normalisation is on but there are no train features; scores are raw")
        refs_ref, train_ref = ray.put(refs), ray.put(train)
        run_tasks(search_shard, [(run, key, n, refs_ref, train_ref, cfg.search) for n in todo], f"search {key}")
