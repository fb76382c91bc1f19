"""Memory and lookup time of a service replica's id -> path map: a dict of Python strings vs
:class:`ensemble.index.reader.IdPaths` (sorted Arrow columns, binary search).

    python bench/id_paths.py [--references 1000000]

The id map of ``--references`` images (ids ``R0000000``..., paths as in a DISC21 folder) is
built from the Arrow table an index version reads; printed: the Python heap it holds
(tracemalloc) plus its Arrow buffers, and the mean time of 20,000 lookups of live ids.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import pyarrow as pa

from ensemble.index.reader import IdPaths


def table(n: int) -> pa.Table:
    ids = [f"R{i:07d}" for i in np.random.default_rng(0).permutation(n)]
    return pa.table({"image_id": ids, "path": [f"/mnt/copydet/disc21/references/{i}.jpg" for i in ids]})


def measure(name: str, images: pa.Table, build) -> None:
    pool = pa.total_allocated_bytes()
    tracemalloc.start()
    paths = build(images)
    heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    arrow = pa.total_allocated_bytes() - pool
    probe = images.column("image_id").to_pylist()[:: max(1, len(images) // 20_000)]
    t0 = time.perf_counter()
    assert all(paths.get(i) is not None for i in probe)
    us = (time.perf_counter() - t0) / len(probe) * 1e6
    print(f"{name:8s} {heap / 2**20:7.1f} MiB Python heap + {arrow / 2**20:6.1f} MiB Arrow | "
          f"{(heap + arrow) / len(images):6.1f} B/reference | lookup {us:5.2f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--references", type=int, default=1_000_000)
    args = ap.parse_args()
    images = table(args.references)
    print(f"{args.references} references")
    measure("dict", images, lambda t: dict(zip(t.column("image_id").to_pylist(), t.column("path").to_pylist())))
    measure("IdPaths", images, IdPaths)


if __name__ == "__main__":
    main()
