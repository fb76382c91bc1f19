"""Inner-product kNN with faiss (descriptors are L2-normalised, so IP = cosine).

Thin functions on arrays in the style of faiss ``contrib``: :func:`knn` for a database that
fits in memory, :func:`build_index` for one shard of a large reference set (the index kind is
decided once per reference set by :func:`index_kind`, so every shard and ``copydet plan`` agree)
and :func:`merge_topk`, the one place where per-shard top-k lists become a global top-k.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger k searches on the CPU
Hits = tuple[np.ndarray, np.ndarray, np.ndarray]  # scores, image ids, patch ids: (n, k) each


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (n, d) array, got shape {x.shape}")
    return x


def _on_gpus(index: faiss.Index, k: int) -> faiss.Index:
    """``index`` on every GPU faiss sees (unchanged without one, or when ``k`` is too large)."""
    if faiss.get_num_gpus() > 0 and k <= GPU_MAX_K:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database rows by inner product for each query: ``(scores, indices)``, best first.

    ``k`` is clipped to the database size, so every returned index is a real row (never -1).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries, database = _as_f32(queries, "queries"), _as_f32(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={queries.shape[1]}, database d={database.shape[1]}")
    k = min(k, len(database))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    index = _on_gpus(faiss.IndexFlatIP(database.shape[1]), k)
    index.add(database)
    scores, indices = index.search(queries, k)
    return scores, indices


@dataclass(frozen=True)
class IndexSpec:
    """How a reference set is indexed (mirrors ``search.*`` of the pipeline config)."""

    exact_max: int = 2_000_000  # reference rows (all shards) below which the search is exact
    kind: str = "ivfpq"
    nlist: int = 4096
    nprobe: int = 32
    pq_m: int = 32
    refine: str = "sq8"  # re-rank IVF-PQ hits with stored vectors: none | sq8 (1 byte/dim) | fp16 | flat
    refine_k: float = 4.0  # hits re-ranked per requested neighbour
    hnsw_m: int = 32
    ef_search: int = 128


APPROX_KINDS = ("ivfpq", "hnsw")  # what search.kind may name past search.exact_max
INDEX_KINDS = ("flat", *APPROX_KINDS)
REFINE_BYTES = {"none": 0, "sq8": 1, "fp16": 2, "flat": 4}  # bytes per dimension kept for re-ranking
_REFINE_CODES = {"sq8": "QT_8bit", "fp16": "QT_fp16"}


def index_kind(total_rows: int, spec: IndexSpec) -> str:
    """The index every shard of a reference set of ``total_rows`` vectors builds.

    Decided once for the whole set, so shards never mix exact and approximate scores.
    """
    if spec.kind not in APPROX_KINDS:
        raise ValueError(f"unknown index kind {spec.kind!r}; known: {', '.join(APPROX_KINDS)}")
    return "flat" if total_rows < spec.exact_max else spec.kind


def index_bytes(rows: int, dim: int, kind: str, spec: IndexSpec) -> int:
    """Memory of one index of ``rows`` vectors of ``kind`` (what :func:`build_index` allocates)."""
    if kind == "flat":
        return rows * dim * 4
    if kind == "hnsw":
        return rows * (dim * 4 + spec.hnsw_m * 2 * 4)
    nlist = max(1, min(spec.nlist, rows // 39))
    codebooks = 256 * dim * 4  # 2^8 centroids per sub-quantizer, dim / pq_m floats each
    refine = rows * dim * REFINE_BYTES[spec.refine] + (2 * dim * 4 if spec.refine == "sq8" else 0)
    return rows * (spec.pq_m + 8) + nlist * dim * 4 + codebooks + refine


def index_size(index: faiss.Index | None) -> int:
    """Bytes of an index's serialised form (what it holds in memory, without allocator slack)."""
    if index is None:
        return 0
    if type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    return int(faiss.serialize_index(index).nbytes)


def build_index(x: np.ndarray, kind: str, spec: IndexSpec, k_max: int = 1) -> faiss.Index:
    """An inner-product index of ``kind`` (see :func:`index_kind`) over the rows ``x``."""
    n, d = x.shape
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(spec.ef_search, k_max)
    elif kind == "ivfpq":
        if d % spec.pq_m:
            raise ValueError(f"search.pq_m={spec.pq_m} must divide the feature dim {d}")
        nlist = max(1, min(spec.nlist, n // 39))
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = min(spec.nprobe, nlist)
        index = _refined(ivf, spec)
        sample = np.random.default_rng(0).choice(n, min(n, nlist * 256), replace=False)
        index.train(x[np.sort(sample)])
    else:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    if kind == "flat" or (kind == "ivfpq" and spec.refine == "none"):  # what faiss clones to GPUs
        index = _on_gpus(index, k_max)
    index.add(x)
    return index


def _refined(ivf: faiss.Index, spec: IndexSpec) -> faiss.Index:
    """``ivf`` whose best ``k * refine_k`` hits are re-scored with stored vectors (exact or
    scalar-quantised); unchanged with ``refine: none``."""
    if spec.refine not in REFINE_BYTES:
        raise ValueError(f"unknown refine {spec.refine!r}; known: {', '.join(REFINE_BYTES)}")
    if spec.refine == "none":
        return ivf
    d = ivf.d
    store = faiss.IndexFlatIP(d) if spec.refine == "flat" else faiss.IndexScalarQuantizer(
        d, getattr(faiss.ScalarQuantizer, _REFINE_CODES[spec.refine]), faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefine(ivf, store)
    index.k_factor = spec.refine_k
    return index


def merge_topk(parts: Sequence[Hits], k: int) -> Hits:
    """Merge per-shard ``(scores, image_ids, patch_ids)`` into the best ``k`` per query row.

    A stable sort keeps earlier shards first among equal scores, like one index over the
    concatenated rows.
    """
    scores = np.concatenate([p[0] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]

    def pick(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, axis=1)

    return (pick(scores), pick(np.concatenate([p[1] for p in parts], axis=1)),
            pick(np.concatenate([p[2] for p in parts], axis=1)))
