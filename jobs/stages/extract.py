"""Stage 3: patches x (model, scale) -> features/<model>@<scale>/<shard>.parquet.

One Ray Data pipeline per (model, scale) runs every pending shard through a pool of model
actors (one per GPU when the cluster has GPUs, CPU actors otherwise); the driver collects
rows per shard and writes a shard as soon as all of its patches are embedded.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from tqdm.auto import tqdm

from core.contracts import ERRORS_SCHEMA
from core.store import features_table, join, read_table, write_table
from jobs.config import ExtractConfig, ModelEntry, PipelineConfig
from jobs.layout import RunDir, pin_settings, shard_names
from jobs.runtime import cluster_gpus
from patchers.extract import Embedder

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 256


def actor_resources(cfg: ExtractConfig) -> dict:
    """Pool size and per-actor resources, all from the config; GPUs only if present."""
    gpus = cluster_gpus() if cfg.use_gpu != "no" else 0.0
    if cfg.use_gpu == "yes" and not gpus:
        raise RuntimeError("extract.use_gpu is 'yes' but the Ray cluster has no GPUs")
    if gpus:
        size = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        return {"size": size, "num_gpus": cfg.gpus_per_actor, "num_cpus": cfg.cpus_per_actor, "threads": None}
    size = cfg.actors or 1
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return {"size": size, "num_gpus": 0, "num_cpus": cfg.cpus_per_actor,
            "threads": cfg.num_threads or max(1, cpus // size)}


def pending_rows(run: RunDir, names: list[str], paths: pa.Table) -> pa.Table:
    tables = []
    for name in names:
        t = read_table(join(run.patches, name))
        t = t.append_column("shard", pa.array([name] * t.num_rows, pa.string()))
        tables.append(t.append_column("split", pa.array([name.split("-", 1)[0]] * t.num_rows, pa.string())))
    return pa.concat_tables(tables).join(paths, ["image_id", "split"])


def run_extract_key(cfg: PipelineConfig, run: RunDir, entry: ModelEntry, scale: int, key: str,
                    paths: pa.Table) -> None:
    out = run.features(key)
    pooled = {"pool": entry.pool} if entry.pool else {}
    pin_settings(out, {"model": entry.name, "scale": scale, "dim": entry.dim, "dtype": entry.dtype, **pooled},
                 "extract")
    names = [n for n in shard_names(run.patches) if n not in set(shard_names(out))]
    if not names:
        return
    rows = pending_rows(run, names, paths)
    expected = {n: c for n, c in zip(*np.unique(rows.column("shard").to_numpy(zero_copy_only=False),
                                                return_counts=True))}
    res = actor_resources(cfg.extract)
    blocks = [rows.slice(i, ROWS_PER_BLOCK) for i in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    ds = ray.data.from_arrow(blocks).map_batches(
        Embedder, batch_size=entry.batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(model=entry.name, scale=scale, dim=entry.dim, pool=entry.pool,
                                   registry=cfg.registry, num_threads=res["threads"]),
        compute=ActorPoolStrategy(size=res["size"]), num_cpus=res["num_cpus"], num_gpus=res["num_gpus"])
    # Ray Data restarts dead actors and retries their batches by default (max_restarts=-1).
    got: dict[str, list[dict]] = defaultdict(list)
    bad = 0
    with tqdm(total=rows.num_rows, desc=f"extract {key}", unit="patch") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, shard in enumerate(batch["shard"]):
                got[shard].append({k: batch[k][i] for k in ("image_id", "patch_id", "embedding", "error")})
                if len(got[shard]) == expected[shard]:
                    bad += write_features_shard(run, out, key, entry, scale, shard, got.pop(shard),
                                                batch["embedding"].shape[1])
            bar.update(len(batch["shard"]))
    if bad:
        log.info(f"extract {key}: {bad} patch(es) failed, listed in {run.errors}")


def write_features_shard(run: RunDir, out: str, key: str, entry: ModelEntry, scale: int, shard: str,
                         rows: list[dict], dim: int) -> int:
    """Write one finished shard (sorted, failures to errors.parquet/); returns #failures."""
    rows.sort(key=lambda r: (r["image_id"], int(r["patch_id"])))
    failed = [r for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    if failed:
        errs = sorted({r["error"] for r in failed})
        write_table(pa.Table.from_pylist([{"path": e.split(":", 1)[0], "error": e} for e in errs],
                                         schema=ERRORS_SCHEMA), join(run.errors, f"extract-{key}-{shard}"))
    emb = np.stack([r["embedding"] for r in good]) if good else np.zeros((0, dim), np.float32)
    table = features_table([r["image_id"] for r in good], [int(r["patch_id"]) for r in good],
                           entry.name, scale, emb, entry.dtype)
    write_table(table, join(out, shard))
    return len(failed)


def run_extract(cfg: PipelineConfig, run: RunDir) -> None:
    paths = read_table(run.manifest, columns=["image_id", "path", "split"])
    for entry, scale, key in cfg.model_keys():
        run_extract_key(cfg, run, entry, scale, key, paths)

