"""Writing predictions.csv (``core.metrics.write_predictions``) at 1M, 4M and 16M rows: seconds
and the Python heap it takes on top of the Arrow table (``tracemalloc`` peak, a separate pass).

    python bench/write_predictions.py [--rows 1000000 4000000 16000000] [--work DIR]

The predictions of DISC21's 1M queries, 10 references each, are 10M rows, written by the driver
of the fuse and verify stages and by ``copydet index match``. Figures: the heap per row written
should fall as rows grow (written in slices: a flat peak), and seconds per million rows stay flat.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.metrics import write_predictions


def predictions(rows: int, k: int = 10) -> pa.Table:
    """``rows`` ISC21 rows, ``k`` per query, ids like DISC21's (Q000000, R000000)."""
    rng = np.random.default_rng(0)
    queries = pa.array(np.char.add("Q", np.char.zfill((np.arange(rows) // k).astype(str), 6)))
    refs = pa.array(np.char.add("R", np.char.zfill(rng.integers(0, 1_000_000, rows).astype(str), 6)))
    return pa.table({"query_id": queries, "reference_id": refs,
                     "score": pa.array(rng.random(rows, dtype=np.float32))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    p.add_argument("--work", default="runs/bench_write_predictions")
    args = p.parse_args()
    out = Path(args.work) / "predictions.csv"
    for rows in args.rows:
        table = predictions(rows)
        t0 = time.perf_counter()
        write_predictions(table, out)
        seconds = time.perf_counter() - t0
        tracemalloc.start()
        write_predictions(table, out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{rows:>11,} rows: {seconds:6.1f} s ({seconds / rows * 1e6:.2f} s per million rows), "
              f"Python heap peak {peak / 2**20:8.1f} MiB ({peak / rows:.0f} B per row), "
              f"file {out.stat().st_size / 2**20:.0f} MiB, table {table.nbytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
