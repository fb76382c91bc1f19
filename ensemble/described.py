"""Images described once per run: a Parquet store of what a verification scorer computes per
image (keypoints, region tokens), so that a reference among many queries' candidates, or a query
verified against references and then against train decoys, is described once, not once per task.

A shard holds ``(image_id, described)`` rows of one side (``query``, ``reference``, ``train``),
sorted by id in small row groups, so a task reads only the rows it needs. ``described`` is the
scorer's :meth:`~ensemble.verify.PairScorer.pack` arrays as an ``.npz`` blob (read back without
pickle).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.store import atomic_output, filesystem, list_shards, read_table

ROWS_PER_GROUP = 8  # a task reads whole row groups: small ones, little waste


def to_blob(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_blob(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_described(rows: Iterable[tuple[str, bytes]], path: str) -> int:
    """Write ``(image_id, blob)`` rows sorted by id, atomically; returns the row count."""
    rows = sorted(rows)
    table = pa.table({"image_id": pa.array([r[0] for r in rows], pa.string()),
                      "described": pa.array([r[1] for r in rows], pa.binary())})
    with atomic_output(path) as f:
        pq.write_table(table, f, row_group_size=ROWS_PER_GROUP)
    return table.num_rows


def index_described(folder: str, side: str) -> dict[str, str]:
    """image id -> the shard of ``folder`` that holds it, for one side (ids only are read)."""
    return {i: s for s in list_shards(folder, f"{side}-") for i in read_table(s, ["image_id"]).column(0).to_pylist()}


def read_described(shards: Mapping[str, str]) -> dict[str, dict[str, np.ndarray]]:
    """image id -> its packed description, for the ids of ``shards`` (id -> shard)."""
    by_shard: dict[str, list[str]] = {}
    for image_id, shard in shards.items():
        by_shard.setdefault(shard, []).append(image_id)
    out: dict[str, dict[str, np.ndarray]] = {}
    for shard, ids in by_shard.items():
        fs, p = filesystem(shard)
        table = pq.read_table(p, filesystem=fs, filters=[("image_id", "in", ids)])
        for image_id, blob in zip(table.column("image_id").to_pylist(), table.column("described").to_pylist()):
            out[image_id] = from_blob(blob)
    missing = sorted(set(shards) - set(out))[:5]
    if missing:
        raise ValueError(f"described images missing from their shards: {missing}")
    return out
