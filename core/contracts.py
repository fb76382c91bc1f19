"""The data contracts between stages (../shared/DESIGN.md): table schemas, shard and chunk names.

Every stage writes and reads these tables; nothing else defines a column.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("split", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
])
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])
PATCHES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("patch_id", pa.int32()), ("kind", pa.string()),
    ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
    ("rotation", pa.int16()), ("flip", pa.bool_()), ("source_score", pa.float32()),
])
CANDIDATES_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query_patch", pa.int32()), ("reference_id", pa.string()),
    ("reference_patch", pa.int32()), ("model", pa.string()), ("score", pa.float32()),
])
PREDICTIONS_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("reference_id", pa.string()), ("score", pa.float32()),
])
WHOLE_PATCH = 0  # patch 0 of every image is the whole image


def features_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Schema of a feature shard: one L2-normalised embedding per (image, patch)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("image_id", pa.string()), ("patch_id", pa.int32()), ("model", pa.string()),
        ("scale", pa.int16()), ("embedding", pa.list_(value, dim)),
    ])


def shard_file(split: str, index: int) -> str:
    """Name of shard ``index`` of ``split``: ``<split>-<index:05d>.parquet``."""
    return f"{split}-{index:05d}.parquet"


def shard_split(name: str) -> str:
    """The split a shard file belongs to (``query-00003.parquet`` -> ``query``)."""
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


def plan_chunks(image_ids: Sequence[str], chunk_patches: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of a patch table (rows grouped by image) that hold whole
    images and at most ``chunk_patches`` rows each (an image with more rows gets a chunk alone)."""
    if chunk_patches < 1:
        raise ValueError(f"chunk_patches must be >= 1, got {chunk_patches}")
    ids = np.asarray(image_ids, dtype=object)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    bounds = [*starts.tolist(), len(ids)]
    out, start = [], 0
    for image_start, image_stop in zip(bounds[:-1], bounds[1:]):
        if image_stop - start > chunk_patches and image_start > start:
            out.append((start, image_start))
            start = image_start
    if len(ids):
        out.append((start, len(ids)))
    return out


def chunk_file(shard: str, index: int) -> str:
    """Feature file of chunk ``index`` of patch shard ``shard`` (``query-00002-0003.parquet``)."""
    return f"{shard.removesuffix('.parquet')}-{index:04d}.parquet"
