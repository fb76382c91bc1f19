"""Score normalisation against a training set (DISC21 baseline / SSCD).

A query that resembles many unrelated training images (a texture, a blank frame) gets high
similarities to everything; subtracting ``beta *`` its similarity to its nearest training
descriptors makes scores of different queries comparable under one global threshold.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from core.knn import knn
from core.store import embeddings_from_arrow


def neighbour_similarity(queries: np.ndarray, train: np.ndarray, n: int = 1) -> np.ndarray:
    """Mean of the ``n`` highest inner products of each query with the training descriptors."""
    if n < 1 or n > len(train):
        raise ValueError(f"neighbours n={n} must be in [1, {len(train)}] (the training set size)")
    scores, _ = knn(queries, train, n)
    return scores.mean(axis=1, dtype=np.float64).astype(np.float32)


def bias_table(query_feats: pa.Table, train: np.ndarray, n: int = 1) -> pa.Table:
    """``(image_id, patch_id, bias)`` for a feature table: its patches' neighbour similarity."""
    bias = neighbour_similarity(embeddings_from_arrow(query_feats.column("embedding")), train, n)
    return pa.table({"image_id": query_feats.column("image_id"), "patch_id": query_feats.column("patch_id"),
                     "bias": pa.array(bias, pa.float32())})


def normalize_scores(candidates: pa.Table, bias: pa.Table, beta: float) -> pa.Table:
    """Candidates with ``score - beta * bias`` of their query patch.

    ``bias`` is an ``(image_id, patch_id, bias)`` table (see :func:`bias_table`) joined on
    ``(query_id, query_patch)``; every query patch of the candidates must be in it.
    """
    keys = pd.MultiIndex.from_arrays([bias.column("image_id").to_numpy(zero_copy_only=False),
                                      bias.column("patch_id").to_numpy()])
    if not keys.is_unique:
        dup = keys[keys.duplicated()][0]
        raise ValueError(f"bias table: (image_id, patch_id) {dup} appears more than once")
    wanted = pd.MultiIndex.from_arrays([candidates.column("query_id").to_numpy(zero_copy_only=False),
                                        candidates.column("query_patch").to_numpy()])
    at = keys.get_indexer(wanted)
    if (at < 0).any():
        raise ValueError(f"bias table has no entry for {int((at < 0).sum())} candidate rows, "
                         f"e.g. query patch {wanted[int(np.argmax(at < 0))]}")
    b = bias.column("bias").to_numpy().astype(np.float64)[at]
    score = candidates.column("score").to_numpy().astype(np.float64) - beta * b
    i = candidates.schema.get_field_index("score")
    return candidates.set_column(i, candidates.schema.field(i), pa.array(score, candidates.schema.field(i).type))
