"""The verify stage's driver cost per window: its bookkeeping alone, at growing query counts.

    python bench/verify_windows.py [--queries 4000 16000 64000 --window 250 --top-k 3 --decoy-top-k 2]

A run of ``n`` queries (``top-k`` candidates and ``decoy-top-k`` train decoys each, random
scores) is verified ``--window`` queries at a time by the stage's own ``check_passes``, with
the Ray tasks replaced by an in-process stand-in that writes each task's cache shard with
made-up columns and describes nothing. What is timed is what the driver does, the stand-in's
writes (the workers' part) left out: picking each window's pairs, finding the pairs still to
score, looking up each window's files in the run's manifest (which lists every query, reference
and train image), cutting tasks, naming shards. Each size is timed twice: a fresh run, then a
resumed one with everything cached. At a fixed window, a 4x larger run has 4x the windows, so
linear bookkeeping costs ~4x; a cost that reads what earlier windows wrote grows ~16x (the
manifest lookups are such a cost: each window reads the manifest, filtered to its ids).
Also printed: the Python heap of the whole id -> file map (what the driver held before its
lookups went to the manifest) and of one window's lookup of its references.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from unittest import mock

import numpy as np
import pyarrow as pa

from core.contracts import shard_file
from core.store import chunks, join, read_table, write_table
from jobs.config import load_config
from jobs.layout import RunDir, paths_of
from jobs.stages import verify
from jobs.stages.verify import Pass, check_passes


def predictions(n: int, k: int, refs: str, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    queries = np.repeat([f"Q{i:07d}" for i in range(n)], k)
    references = [f"{refs}{j:07d}" for j in rng.integers(0, 10 * n, n * k)]
    return pa.table({"query_id": queries, "reference_id": references,
                     "score": pa.array(rng.random(n * k, dtype=np.float32))})


WORKERS = [0.0]  # seconds the stand-in spent writing


def stand_in(fn, calls, desc: str, options: dict | None = None) -> list:
    """``run_tasks`` without Ray or scoring: a verify task's shard gets constant columns."""
    if fn is not verify.verify_chunk:
        return [0] * len(calls)
    start = time.perf_counter()
    for part, _shards, _job, _top_k, out in calls:
        n = part.num_rows
        write_table(part.select(verify.KEYS).append_column("inliers", pa.array(np.zeros(n, np.int32)))
                    .append_column("keypoints", pa.array(np.zeros(n, np.int32))), out)
    WORKERS[0] += time.perf_counter() - start
    return [c[0].num_rows for c in calls]


def write_manifest(n: int, run: RunDir, shard_size: int = 1000) -> None:
    """The run's images, ``n`` queries, ``10 n`` references and ``10 n`` train photos, in shards of
    ``shard_size`` named by split, as the manifest stage writes them (patches.shard_size)."""
    ids = {"query": [f"Q{i:07d}" for i in range(n)], "reference": [f"R{j:07d}" for j in range(10 * n)],
           "train": [f"T{j:07d}" for j in range(10 * n)]}
    for split, names in ids.items():
        for i, a, b in chunks(len(names), shard_size):
            write_table(pa.table({"image_id": names[a:b], "path": [f"/data/{split}/{x}.jpg" for x in names[a:b]],
                                  "split": [split] * (b - a)}), join(run.manifest, shard_file(split, i)))


def whole_map(run: RunDir) -> dict[str, dict[str, str]]:
    """split -> id -> file of every image: what the driver held before its lookups went to the manifest."""
    rows = read_table(run.manifest)
    paths: dict[str, dict[str, str]] = {}
    for i, p, s in zip(*(rows.column(c).to_pylist() for c in ("image_id", "path", "split"))):
        paths.setdefault(s, {})[i] = p
    return paths


def heap_mb(fn, *args) -> float:
    """Peak Python heap (MB) while ``fn(*args)`` runs and holds its result."""
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


def timed(cfg, run: RunDir, passes: list[Pass]) -> float:
    """The driver's seconds in ``check_passes``."""
    WORKERS[0] = 0.0
    start = time.perf_counter()
    check_passes(cfg, run, passes)
    return time.perf_counter() - start - WORKERS[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, nargs="+", default=[4000, 16000, 64000])
    ap.add_argument("--window", type=int, default=250)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--decoy-top-k", type=int, default=2)
    args = ap.parse_args()
    print(f"window {args.window} queries, top-k {args.top_k}, decoys {args.decoy_top_k}")
    print(f"{'queries':>8} {'windows':>8} {'fresh s':>9} {'x prev':>7} {'resumed s':>10} {'x prev':>7} "
          f"{'map MB':>8} {'window MB':>10}")
    prev = None
    with mock.patch.object(verify, "run_tasks", stand_in):
        for n in args.queries:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(None, [f"output={tmp}", "verify.enabled=true", f"verify.top_k={args.top_k}",
                                         f"verify.decoy_top_k={args.decoy_top_k}", f"verify.window={args.window}"])
                passes = [Pass(predictions(n, args.top_k, "R", 0), args.top_k),
                          Pass(predictions(n, args.decoy_top_k, "T", 1), args.decoy_top_k, decoys=True)]
                run = RunDir(tmp)
                write_manifest(n, run)
                fresh, resumed = timed(cfg, run, passes), timed(cfg, run, passes)
                window = passes[0].fused.slice(0, args.window * args.top_k).column("reference_id").to_pylist()
                memory = heap_mb(whole_map, run), heap_mb(paths_of, run, "reference", window)
            ratios = ("", "") if prev is None else (f"{fresh / prev[0]:.1f}", f"{resumed / prev[1]:.1f}")
            print(f"{n:>8} {-(-n // args.window):>8} {fresh:>9.2f} {ratios[0]:>7} {resumed:>10.2f} {ratios[1]:>7} "
                  f"{memory[0]:>8.0f} {memory[1]:>10.1f}", flush=True)
            prev = (fresh, resumed)


if __name__ == "__main__":
    main()
