"""PCA (optionally whitened) fit on training features, and feature concatenation of members.

Whitening with a PCA learnt on training images that are disjoint from the references is the
usual last step of ISC21 descriptors: it spreads the variance evenly over the kept
dimensions, so the inner product stops being dominated by a few directions shared by all
images. A fitted :class:`Pca` is saved as safetensors (arrays) with its settings in the
file's JSON header, never pickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from core.contracts import features_schema
from core.knn import l2_normalize
from core.store import embeddings_from_arrow, embeddings_to_arrow, write_bytes

FEATURE_KEYS = ["image_id", "patch_id"]



@dataclass
class Pca:
    """``y = normalize(matrix @ (x - mean))``; with ``whiten`` the rows of ``matrix`` are
    already scaled by ``eigenvalue ** -0.5``. ``key`` names the features it was fit on."""

    mean: np.ndarray  # (d_in,)
    matrix: np.ndarray  # (dim, d_in)
    eigenvalues: np.ndarray  # (dim,) variances of the training data along the kept axes
    dim: int
    whiten: bool
    key: str = ""
    fit_rows: int | None = None  # the sample cap it was fit under (reduce.fit_rows); None: not recorded

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Project ``(n, d_in)`` descriptors to ``(n, dim)`` and re-L2-normalise."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"PCA {self.key or ''}: expected (n, {self.mean.shape[0]}) descriptors, got {x.shape}")
        return l2_normalize((x - self.mean) @ self.matrix.T)

    def apply_table(self, feats: pa.Table) -> pa.Table:
        """A feature table with its ``embedding`` column projected (other columns kept)."""
        dtype = "float16" if feats.schema.field("embedding").type.value_type == pa.float16() else "float32"
        emb = embeddings_to_arrow(self.apply(embeddings_from_arrow(feats.column("embedding"))), dtype)
        i = feats.schema.get_field_index("embedding")
        return feats.set_column(i, features_schema(self.dim, dtype).field("embedding"), emb)


def fit_pca(x: np.ndarray, dim: int, whiten: bool, key: str = "") -> Pca:
    """Fit on ``(n, d)`` training descriptors, keeping the ``dim`` leading components."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"fit_pca: expected an (n, d) array, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(n, d):
        raise ValueError(f"fit_pca: dim={dim} must be in [1, min(n={n}, d={d})]")
    pca = faiss.PCAMatrix(d, dim, -0.5 if whiten else 0.0, False)
    pca.train(x)
    eig = faiss.vector_to_array(pca.eigenvalues)[:dim] / n  # faiss: sums of squares -> variances
    matrix = faiss.vector_to_array(pca.A).reshape(dim, d)
    if whiten:
        matrix = matrix * np.sqrt(n)  # unit variance (faiss whitens to unit sum of squares)
    if whiten and eig.min() <= 1e-8 * max(float(eig.max()), 1e-30):
        raise ValueError(f"fit_pca: component {int(np.argmin(eig))} has ~zero variance; "
                         f"whitening would blow it up (use dim <= rank of the training data)")
    return Pca(mean=faiss.vector_to_array(pca.mean).astype(np.float32), matrix=matrix.astype(np.float32),
               eigenvalues=eig.astype(np.float32), dim=dim, whiten=whiten, key=key)


def save_pca(pca: Pca, path: str | os.PathLike) -> str:
    """Write the arrays as safetensors, dim/whiten/key/fit_rows in its JSON metadata (temp name, then rename)."""
    meta = {"dim": str(pca.dim), "whiten": str(pca.whiten).lower(), "key": pca.key}
    if pca.fit_rows is not None:
        meta["fit_rows"] = str(pca.fit_rows)
    data = save({"mean": pca.mean, "matrix": pca.matrix, "eigenvalues": pca.eigenvalues}, metadata=meta)
    return write_bytes(path, data)


def load_pca(path: str | os.PathLike) -> Pca:
    """Read a file written by :func:`save_pca`."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable PCA safetensors file: {e}") from e
    missing = [k for k in ("mean", "matrix", "eigenvalues") if k not in arrays] + \
              [k for k in ("dim", "whiten") if k not in meta]
    if missing:
        raise ValueError(f"{path}: not a PCA file, missing {missing}")
    pca = Pca(mean=arrays["mean"], matrix=arrays["matrix"], eigenvalues=arrays["eigenvalues"],
              dim=int(meta["dim"]), whiten=meta["whiten"] == "true", key=meta.get("key", ""),
              fit_rows=int(meta["fit_rows"]) if "fit_rows" in meta else None)
    if pca.matrix.shape != (pca.dim, pca.mean.shape[0]):
        raise ValueError(f"{path}: matrix shape {pca.matrix.shape} does not match dim={pca.dim}")
    return pca


def concat_members(tables: list[pa.Table], name: str | None = None) -> pa.Table:
    """One feature table whose embedding is the concatenation of every member's, re-normalised.

    Rows are matched on (image_id, patch_id) and kept in the first table's order; every
    member must have exactly the same rows. ``model`` becomes ``name`` (default: the member
    keys joined by ``+``) and ``scale`` the first member's.
    """
    if not tables:
        raise ValueError("concat_members: no feature tables given")
    first = tables[0]
    keys = _row_keys(first, 0)
    parts = [embeddings_from_arrow(first.column("embedding"))]
    for i, t in enumerate(tables[1:], start=1):
        at = _row_keys(t, i).get_indexer(keys)
        if (at < 0).any() or t.num_rows != first.num_rows:
            raise ValueError(f"concat_members: member {i} has {t.num_rows} rows, member 0 {first.num_rows}; "
                             f"{int((at < 0).sum())} (image_id, patch_id) of member 0 are missing from it")
        parts.append(embeddings_from_arrow(t.column("embedding"))[at])
    emb = l2_normalize(np.concatenate(parts, axis=1))
    label = name or "+".join(f"{t.column('model')[0]}@{t.column('scale')[0]}" if t.num_rows else "?" for t in tables)
    schema = features_schema(emb.shape[1])
    return pa.Table.from_arrays([
        first.column("image_id"), first.column("patch_id"),
        pa.array([label] * first.num_rows, pa.string()), first.column("scale"), embeddings_to_arrow(emb),
    ], schema=schema)


def _row_keys(table: pa.Table, i: int) -> pd.MultiIndex:
    keys = pd.MultiIndex.from_arrays([table.column(k).to_numpy(zero_copy_only=False) for k in FEATURE_KEYS])
    if not keys.is_unique:
        raise ValueError(f"concat_members: member {i} has duplicate (image_id, patch_id) {keys[keys.duplicated()][0]}")
    return keys
