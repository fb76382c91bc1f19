"""Scale-out kNN: reference features split into shards, one Ray actor and faiss index each.

The driver only plans which Parquet rows belong to which shard (from file metadata) and
decides the index kind once for the whole set (:func:`core.knn.index_kind`: exact below
``IndexSpec.exact_max`` rows, else IVF-PQ or HNSW); every :class:`ShardIndex` actor reads its
own rows, builds that index (on the GPU when faiss sees one) and answers top-k queries.
:class:`ShardedIndex` fans each query batch out to every shard in parallel and merges the
per-shard top-k lists, so no process ever holds the whole reference set. Exact shards give the
same neighbours as one flat index.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.contracts import CANDIDATES_SCHEMA, WHOLE_PATCH
from core.knn import Hits, IndexSpec, build_index, index_kind, index_size, merge_topk
from core.store import embeddings_from_arrow, filesystem, read_table

CALL_TIMEOUT_S = 3600.0  # one shard search call; generous for GPU-sized shards


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of one feature Parquet file."""

    path: str
    start: int
    stop: int


def count_rows(paths: Sequence[str]) -> list[int]:
    """Row count of each Parquet file, from its footer only."""
    out = []
    for path in paths:
        fs, p = filesystem(path)
        out.append(pq.read_metadata(p, filesystem=fs).num_rows)
    return out


def count_whole_rows(paths: Sequence[str]) -> int:
    """Whole-image rows (patch 0) over ``paths``, reading the patch_id column only."""
    return sum(int(pc.sum(pc.equal(read_table(p, columns=["patch_id"]).column("patch_id"), WHOLE_PATCH)).as_py()
                   or 0) for p in paths)


def plan_shards(files: Sequence[tuple[str, int]], shard_size: int) -> list[list[Slice]]:
    """Cut ``(path, rows)`` files, in order, into shards of at most ``shard_size`` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards: list[list[Slice]] = [[]]
    room = shard_size
    for path, rows in files:
        start = 0
        while start < rows:
            if room == 0:
                shards.append([])
                room = shard_size
            stop = min(rows, start + room)
            shards[-1].append(Slice(path, start, stop))
            room -= stop - start
            start = stop
    return [s for s in shards if s]


def load_rows(slices: Sequence[Slice], whole_only: bool = False) -> tuple[pa.Table, np.ndarray]:
    """``(image_id, patch_id)`` table and float32 embeddings of the rows in ``slices``
    (only whole-image rows, patch 0, with ``whole_only``)."""
    parts = [read_table(s.path, columns=["image_id", "patch_id", "embedding"]).slice(s.start, s.stop - s.start)
             for s in slices]
    table = pa.concat_tables(parts)
    if whole_only:
        table = table.filter(pc.equal(table.column("patch_id"), WHOLE_PATCH))
    return table.select(["image_id", "patch_id"]), embeddings_from_arrow(table.column("embedding"))


class ShardIndex:
    """One reference shard: its rows' ids and a faiss index; lives in a Ray actor."""

    def __init__(self, slices: Sequence[Slice], kind: str, spec: IndexSpec, k_max: int,
                 whole_only: bool = False) -> None:
        ids, x = load_rows(slices, whole_only)
        self._hold(ids, build_index(x, kind, spec, k_max) if len(x) else None, kind, x.shape[1])
        del x

    @classmethod
    def restore(cls, ids: pa.Table, index: faiss.Index, kind: str) -> ShardIndex:
        """A shard from a saved faiss index and its rows' ``(image_id, patch_id)`` table."""
        shard = cls.__new__(cls)
        shard._hold(ids, index, kind, index.d)
        return shard

    def _hold(self, ids: pa.Table, index: faiss.Index | None, kind: str, dim: int) -> None:
        self.rows, self.dim = ids.num_rows, dim
        self.image_ids = ids.column("image_id").to_numpy(zero_copy_only=False)
        self.patch_ids = ids.column("patch_id").to_numpy()
        self.kind, self.index = kind, index

    def search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``min(k, rows)`` of this shard: scores, image ids, patch ids (padding: -inf, "").
        ``params`` may carry an id selector (rows it rejects are never returned)."""
        k = min(k, self.rows)
        if k == 0:  # a whole_only shard that holds no patch 0
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), object), \
                np.zeros((len(queries), 0), np.int32)
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        missing = idx < 0
        idx = np.where(missing, 0, idx)
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, np.where(missing, "", self.image_ids[idx]), self.patch_ids[idx]

    def info(self) -> dict:
        """Rows, index type, node id (prefix) and this process's resident memory (bytes)."""
        return {"rows": int(self.rows), "dim": int(self.dim), "index": self.kind,
                "faiss": type(self.index).__name__, "bytes": index_size(self.index),
                "rss": psutil.Process(os.getpid()).memory_info().rss,
                "node": ray.get_runtime_context().get_node_id()[:12]}


def hits_table(query_feats: pa.Table, hits: Hits, model: str) -> pa.Table:
    """Merged hits as a CANDIDATES_SCHEMA table (padding rows dropped), best first per patch."""
    scores, image_ids, patch_ids = hits
    nq, k = scores.shape
    keep = np.isfinite(scores).reshape(-1)
    rows = np.repeat(np.arange(nq), k)[keep]
    return pa.Table.from_arrays([
        query_feats.column("image_id").take(rows),
        query_feats.column("patch_id").take(rows),
        pa.array(image_ids.reshape(-1)[keep], pa.string()),
        pa.array(patch_ids.reshape(-1)[keep], pa.int32()),
        pa.array(np.full(len(rows), model, dtype=object), pa.string()),
        pa.array(scores.reshape(-1)[keep], pa.float32()),
    ], schema=CANDIDATES_SCHEMA)


class ShardedIndex:
    """Driver-side handle: one :class:`ShardIndex` actor per shard of ``files``.

    Actors are restarted (and calls retried) when their node dies; a restarted actor
    reloads its own rows, so a lost node costs only that shard's rebuild. With
    ``whole_only`` each actor indexes only the whole-image rows (patch 0) of its slices.
    """

    def __init__(self, files: Sequence[str], spec: IndexSpec, shard_size: int, k_max: int,
                 actor_options: dict | None = None, timeout_s: float = CALL_TIMEOUT_S,
                 whole_only: bool = False) -> None:
        if not files:
            raise ValueError("ShardedIndex: no feature files given")
        counts = count_rows(files)
        self.shards = plan_shards(list(zip(files, counts)), shard_size)
        self.kind = index_kind(count_whole_rows(files) if whole_only else sum(counts), spec)
        self.timeout_s = timeout_s
        remote = ray.remote(ShardIndex).options(max_restarts=3, max_task_retries=3, **(actor_options or {}))
        self.actors = [remote.remote(shard, self.kind, spec, k_max, whole_only) for shard in self.shards]

    @property
    def rows(self) -> int:
        """Rows indexed over all shards (as the actors loaded them, so ``whole_only`` counts too)."""
        return sum(i["rows"] for i in self.info())

    def search_async(self, queries: np.ndarray, k: int) -> list[ray.ObjectRef]:
        """Start ``queries`` on every shard; pass the result to :meth:`merge`."""
        q = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        return [a.search.remote(q, k) for a in self.actors]

    def merge(self, pending: list[ray.ObjectRef], k: int) -> Hits:
        return merge_topk(ray.get(pending, timeout=self.timeout_s), k)

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Top-``k`` over all shards: scores, image ids, patch ids (``(nq, min(k, rows))``)."""
        return self.merge(self.search_async(queries, k), k)

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors], timeout=self.timeout_s)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def format_info(name: str, infos: Sequence[dict]) -> str:
    """One line per shard: rows, index type, node and resident memory of its actor."""
    lines = [f"{name}: {len(infos)} shard(s)"]
    for i, s in enumerate(infos):
        lines.append(f"  shard {i}: {s['rows']} rows x {s['dim']}  {s['faiss']} {s['bytes'] / 2**20:.1f} MiB  "
                     f"node {s['node']}  RSS {s['rss'] / 2**20:.0f} MiB")
    return "\n".join(lines)
