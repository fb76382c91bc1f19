"""Stage 3b (optional): derived descriptors between extract and search.

For each model key (or, with ``reduce.concat``, all keys concatenated into one member) it
fits PCA/whitening on a strided sample of the train split (``reduce.fit_rows``), saves it
(``reduce/<key>.safetensors``, reused on re-runs), projects every split, and optionally
stretches query and reference descriptors away from their train neighbours. The result is
an ordinary feature folder, ``features/<search key>/``, so search and fuse need no changes.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pyarrow as pa
import ray

from core.settings import pin_settings
from core.store import embeddings_from_arrow, exists, join, num_rows, read_table, write_table
from ensemble.reduce import Pca, concat_members, fit_pca, load_pca, save_pca
from ensemble.stretch import stretch_table
from jobs.completeness import require_features
from jobs.config import PipelineConfig, ReduceConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import run_tasks

log = logging.getLogger(__name__)


def member_table(run: RunDir, keys: list[str], shard: str) -> pa.Table:
    tables = [read_table(join(run.features(k), shard)) for k in keys]
    return tables[0] if len(tables) == 1 else concat_members(tables)


def reduce_shard(run: RunDir, keys: list[str], out_key: str, shard: str,
                 fitted: tuple[Pca | None, np.ndarray | None], cfg: ReduceConfig) -> int:
    pca, train = fitted
    tables = [read_table(join(run.features(k), shard)) for k in keys]
    t = derive(tables, out_key, pca, train if not shard.startswith("train-") else None, cfg)
    write_table(t, join(run.features(out_key), shard))
    return t.num_rows


def derive(tables: list[pa.Table], out_key: str, pca: Pca | None, train: np.ndarray | None,
           cfg: ReduceConfig) -> pa.Table:
    """One group's member feature tables (same rows) -> its derived search-key table: members
    concatenated, PCA applied, stretched against ``train`` (None: not stretched, as train/ itself)."""
    t = tables[0] if len(tables) == 1 else concat_members(tables)
    if pca is not None:
        t = pca.apply_table(t)
    if cfg.stretch and train is not None:
        t = stretch_table(t, train, cfg.stretch_neighbours, cfg.stretch_beta)
    return t.set_column(t.schema.get_field_index("model"), "model", pa.array([out_key] * t.num_rows, pa.string()))


def stride(total: int, rows: int) -> int:
    """Every n-th row keeps at most ``rows`` of ``total``."""
    return max(1, -(-total // rows))


def train_sample(run: RunDir, keys: list[str], shards: list[str], rows: int) -> np.ndarray:
    """At most ``rows`` of the group's train descriptors, every n-th over the shards in order, read one
    shard at a time: a PCA needs a sample, and DISC21's train/ does not fit in one process."""
    step = stride(sum(num_rows(join(run.features(keys[0]), s)) for s in shards), rows)
    parts, at = [], 0
    for shard in shards:
        emb = embeddings_from_arrow(member_table(run, keys, shard).column("embedding"))
        parts.append(emb[(-at) % step::step])
        at += len(emb)
    return np.concatenate(parts)


def fit_or_load(run: RunDir, keys: list[str], out_key: str, cfg: ReduceConfig) -> tuple[Pca | None, np.ndarray | None]:
    """The group's PCA (fit on a train sample, saved once and reused) and, for stretching, every
    projected train descriptor (the neighbours it pushes away from)."""
    train_shards = shard_names(run.features(keys[0]), "train")
    if not train_shards:
        if cfg.dim or cfg.stretch:
            raise RuntimeError(f"reduce {out_key}: PCA and stretching are fit on train/, which has no features")
        return None, None
    full = None  # stretching needs every train descriptor; then the PCA's sample is taken from them
    if cfg.stretch:
        full = embeddings_from_arrow(pa.concat_tables([member_table(run, keys, s) for s in train_shards])
                                     .column("embedding"))
        check_train_rows(cfg, len(full), f"reduce {out_key}")
    pca = None
    if cfg.dim:
        path = run.pca(out_key)
        pca = load_pca(path) if exists(path) else None
        if pca is None or pca.fit_rows not in (None, cfg.fit_rows):  # a file left by a folder fit otherwise
            x = (full[::stride(len(full), cfg.fit_rows)] if full is not None
                 else train_sample(run, keys, train_shards, cfg.fit_rows))
            if x.shape[0] <= cfg.dim or x.shape[1] < cfg.dim:
                raise ValueError(f"reduce {out_key}: reduce.dim={cfg.dim} needs more than {cfg.dim} train descriptors "
                                 f"of at least {cfg.dim} values; the sample (reduce.fit_rows={cfg.fit_rows}) has "
                                 f"{x.shape[0]} of {x.shape[1]}: lower reduce.dim or add train images")
            pca = replace(fit_pca(x, cfg.dim, cfg.whiten, key=out_key), fit_rows=cfg.fit_rows)
            save_pca(pca, path)
    return pca, (pca.apply(full) if pca and full is not None else full)


def check_train_rows(r: ReduceConfig, train_rows: int, where: str) -> None:
    """Refuse a PCA or stretching that the train descriptors cannot give (extract checks it from the
    patches, before its work): more dimensions, or more stretching neighbours, than descriptors."""
    if r.dim and 0 < min(train_rows, r.fit_rows) <= r.dim:
        raise ValueError(f"{where}: reduce.dim={r.dim} needs more than {r.dim} train descriptors; there are "
                         f"{train_rows} (one per train patch; reduce.fit_rows={r.fit_rows}): lower reduce.dim "
                         "or add train images")
    if r.stretch and 0 < train_rows < r.stretch_neighbours:
        raise ValueError(f"{where}: reduce.stretch_neighbours={r.stretch_neighbours} exceeds the {train_rows} train "
                         "descriptors (one per train patch): lower it or add train images")


def reduce_settings(cfg: PipelineConfig) -> dict:
    """What a derived folder depends on beyond its key's tag (dim, whiten, stretch are in the tag)."""
    return {"fit_rows": cfg.reduce.fit_rows if cfg.reduce.dim else None}


def run_reduce(cfg: PipelineConfig, run: RunDir) -> None:
    if not cfg.reduce.active:
        return
    for keys, out_key in cfg.reduce_groups():
        expected = [require_features(cfg, run, k, "reduce") for k in keys]
        pin_settings(run.features(out_key), reduce_settings(cfg), f"reduce {out_key}")
        done = set(shard_names(run.features(out_key)))
        todo = [n for n in expected[0] if n not in done]
        if not todo:
            continue
        pca, train = fit_or_load(run, keys, out_key, cfg.reduce)
        shared = ray.put((pca, train))  # one copy in the object store for every task
        run_tasks(reduce_shard, [(run, keys, out_key, n, shared, cfg.reduce) for n in todo], f"reduce {out_key}")
        log.info(f"reduce: {'+'.join(keys)} -> {out_key}" + (f" (PCA {pca.dim}{', whitened' if pca.whiten else ''})"
                                                         if pca else ""))
