"""Exact inner-product kNN with faiss (descriptors are L2-normalised, so IP = cosine).

Thin functions on arrays in the style of faiss ``contrib.exhaustive_search``: :func:`knn` for a
database that fits in memory (on every GPU when faiss sees one), :func:`knn_blocks` for a
reference set sharded into blocks that are searched one at a time and merged with a result
heap, and :func:`search_tables` that turns two feature tables into a candidates table.
"""
from __future__ import annotations

from collections.abc import Iterable

import faiss
import numpy as np
import pyarrow as pa

from ensemble.store import CANDIDATES_SCHEMA, embeddings_from_arrow

GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger k searches on the CPU


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (n, d) array, got shape {x.shape}")
    return x


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _flat_index(database: np.ndarray, k: int) -> faiss.Index:
    index = faiss.IndexFlatIP(database.shape[1])
    if faiss.get_num_gpus() > 0 and k <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    return index


def knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database rows by inner product for each query: ``(scores, indices)``, best first.

    ``k`` is clipped to the database size, so every returned index is a real row (never -1).
    """
    _check_k(k)
    queries, database = _as_f32(queries, "queries"), _as_f32(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={queries.shape[1]}, database d={database.shape[1]}")
    k = min(k, len(database))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    scores, indices = _flat_index(database, k).search(queries, k)
    assert (indices >= 0).all(), "flat index returned padding although k <= database size"
    return scores, indices


def knn_blocks(queries: np.ndarray, blocks: Iterable[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` over a database given as consecutive blocks (shards); indices are global rows.

    Only one block is in memory at a time; a result heap keeps the best ``k`` so far.
    """
    _check_k(k)
    queries = _as_f32(queries, "queries")
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    total = 0
    for block in blocks:
        scores, indices = knn(queries, block, k)
        heap.add_result(scores, indices + total)
        total += len(block)
    heap.finalize()
    k = min(k, total)  # heap slots beyond the database size hold padding
    return heap.D[:, :k], heap.I[:, :k]


def search_tables(query_feats: pa.Table, reference_feats: pa.Table, k: int, model: str) -> pa.Table:
    """kNN of every query patch among all reference patches as a CANDIDATES_SCHEMA table.

    Both tables are feature tables (``store.features_schema``); each query patch yields
    ``min(k, #reference patches)`` rows, best first.
    """
    scores, indices = knn(embeddings_from_arrow(query_feats.column("embedding")),
                          embeddings_from_arrow(reference_feats.column("embedding")), k)
    nq, kk = indices.shape
    rows = np.repeat(np.arange(nq), kk)
    cols = indices.reshape(-1)
    return pa.Table.from_arrays([
        query_feats.column("image_id").take(rows),
        query_feats.column("patch_id").take(rows),
        reference_feats.column("image_id").take(cols),
        reference_feats.column("patch_id").take(cols),
        pa.array(np.full(len(rows), model, dtype=object), pa.string()),
        pa.array(scores.reshape(-1), pa.float32()),
    ], schema=CANDIDATES_SCHEMA)
