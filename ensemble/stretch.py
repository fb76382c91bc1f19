"""Descriptor stretching (negative-embedding subtraction, ISC21 descriptor-track winners).

Images from a dense region of descriptor space (sky, text, a common layout) are all close to
each other, so unrelated members of that region look like copies. Subtracting from each
descriptor the similarity-weighted mean of its nearest *training* descriptors removes what
it shares with its neighbourhood and keeps what is specific to the image:

    x' = normalize(x - beta * sum_j w_j t_j / sum_j w_j),  w_j = max(<x, t_j>, 0)

over its ``n`` nearest training descriptors ``t_j``. Apply it to queries and references alike,
before the search.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.knn import knn, l2_normalize
from core.store import embeddings_from_arrow, embeddings_to_arrow


def stretch(x: np.ndarray, train: np.ndarray, n: int, beta: float) -> np.ndarray:
    """Stretched, L2-normalised copies of the ``(m, d)`` descriptors ``x`` (``beta=0``: normalised ``x``)."""
    x = np.asarray(x, dtype=np.float32)
    train = np.asarray(train, dtype=np.float32)
    if not 1 <= n <= len(train):
        raise ValueError(f"stretch: neighbours n={n} must be in [1, {len(train)}] (the training set size)")
    if beta == 0:
        return l2_normalize(x)
    sims, idx = knn(x, train, n)
    w = np.maximum(sims, 0.0)[:, :, None]
    mean = (w * train[idx]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)
    return l2_normalize(x - beta * mean)


def stretch_table(feats: pa.Table, train: np.ndarray, n: int, beta: float) -> pa.Table:
    """A feature table with :func:`stretch` applied to its ``embedding`` column."""
    i = feats.schema.get_field_index("embedding")
    field = feats.schema.field(i)
    dtype = "float16" if field.type.value_type == pa.float16() else "float32"
    emb = stretch(embeddings_from_arrow(feats.column(i)), train, n, beta)
    return feats.set_column(i, field, embeddings_to_arrow(emb, dtype))
