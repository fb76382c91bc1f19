"""Shards left by many small `index add`s, with and without merging by size tier, what a
request pays to search them, and what the service pays to swap in the version an add published.

    python bench/index_shards.py [--base 50000 --adds 150 --rows 500 --dim 256 --train 20000 --fanouts 0 4]

One index version of ``--base`` random unit rows is built, then ``--adds`` versions each add
``--rows`` more (a service's daily adds), through ``ensemble.index.versions`` itself; no model
runs. For each ``--fanouts`` value (0: never merge, the behaviour before tiers) the figures are:
shards left, wall seconds of all the adds (merges included), rows rewritten by merges per row
added, and the search of 32 queries for their top 100 over the last version (best of 5), as a
request of the service does it; then the same after `index compact` (the floor). Both fanouts
run in one process, on the same rows. Then the swap: with the next-to-last version loaded (as a
replica serving it holds it), the last one is loaded fresh and then taking over what the two
share (``IndexVersion(reuse=...)``): seconds and resident memory added.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from core.knn import IndexSpec, l2_normalize
from core.store import features_table, write_table
from ensemble.index import versions
from ensemble.index.layout import IndexDir
from ensemble.index.reader import IndexVersion, KeyIndex


def features(folder: Path, x: np.ndarray, first: int) -> tuple[str, pa.Table]:
    ids = [f"R{i:08d}" for i in range(first, first + len(x))]
    path = write_table(features_table(ids, [0] * len(x), "m", 64, x), folder / f"f{first:08d}.parquet")
    n = len(ids)
    return path, pa.table({"image_id": ids, "path": ids, "sha256": ids, "width": [64] * n, "height": [64] * n})


def run(root: Path, x: np.ndarray, train: np.ndarray, base: int, rows: int, fanout: int, shard_size: int) -> dict:
    idx, spec = IndexDir(root / "index"), IndexSpec()
    path, images = features(root / "f", x[:base], 0)
    background, _ = features(root / "t", train, 0)
    versions.build(idx, "", {}, {"m": versions.KeySource([path], [background])}, images, spec, shard_size)
    rewritten, t0 = 0, time.perf_counter()
    for lo in range(base, len(x), rows):
        path, images = features(root / "f", x[lo:lo + rows], lo)
        with idx.publish() as (name, out):
            before = {s["name"] for s in versions.read_manifest(idx.path(idx.current()))["keys"]["m"]["shards"]}
            meta = versions.add(idx, idx.current(), out, name, {"m": [path]}, images, spec, shard_size, fanout)
        rewritten += sum(s["rows"] for s in meta["keys"]["m"]["shards"] if s["name"] not in before) - len(images)
    adds = time.perf_counter() - t0
    swap = swapped(idx)
    shards, search_ms = searched(idx, x)
    versions.compact(idx, idx.current(), spec, shard_size)
    return {"shards": shards, "adds_s": adds, "rewritten": rewritten / (len(x) - base), "search_ms": search_ms,
            "compacted": searched(idx, x), "swap": swap}


def swapped(idx: IndexDir) -> dict[str, tuple[float, float]]:
    """Seconds and MiB of resident memory to load the last version beside the one before it:
    fresh, and taking over what they share."""
    served = IndexVersion(idx.root, idx.versions()[-2], IndexSpec())
    out = {}
    for how in ("reusing", "fresh"):  # reusing first: memory freed by a fresh load would hide its own
        rss, t0 = psutil.Process().memory_info().rss, time.perf_counter()
        new = IndexVersion(idx.root, idx.current(), IndexSpec(), reuse=served if how == "reusing" else None)
        out[how] = (time.perf_counter() - t0, (psutil.Process().memory_info().rss - rss) / 2**20)
        del new
    return out


def searched(idx: IndexDir, x: np.ndarray) -> tuple[int, float]:
    """Shards of the current version and its search time (ms, best of 5) for 32 queries, top 100."""
    meta = versions.read_manifest(idx.path(idx.current()))["keys"]["m"]
    key = KeyIndex(idx.path(idx.current()) / "keys" / "m", meta, set(), IndexSpec(), 1)
    queries = x[np.random.default_rng(1).choice(len(x), 32, replace=False)]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        key.search(queries, 100)
        times.append(time.perf_counter() - t0)
    return len(meta["shards"]), 1000 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, default=50_000)
    p.add_argument("--adds", type=int, default=150)
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--train", type=int, default=20_000, help="rows of the normalisation background")
    p.add_argument("--shard-size", type=int, default=1_000_000)
    p.add_argument("--fanouts", type=int, nargs="+", default=[0, 4])
    args = p.parse_args()
    x = l2_normalize(np.random.default_rng(0).normal(size=(args.base + args.adds * args.rows, args.dim))
                     .astype(np.float32))
    train = l2_normalize(np.random.default_rng(2).normal(size=(args.train, args.dim)).astype(np.float32))
    print(f"{args.base} rows built, then {args.adds} adds of {args.rows} rows (dim {args.dim}, flat shards, "
          f"{args.train} train rows)")
    print("fanout | shards | adds s | rows rewritten per row added | search 32 x top-100 ms")
    results = []
    for fanout in args.fanouts:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp), x, train, args.base, args.rows, fanout, args.shard_size)
            results.append((fanout, r))
        print(f"{fanout:6d} | {r['shards']:6d} | {r['adds_s']:6.1f} | {r['rewritten']:28.2f} | {r['search_ms']:8.1f}"
              f"  (compacted: {r['compacted'][0]} shard(s), {r['compacted'][1]:.1f} ms)")

    for fanout, r in results:
        (fresh_s, fresh_mib), (reuse_s, reuse_mib) = r["swap"]["fresh"], r["swap"]["reusing"]
        print(f"swap to the last version, fanout {fanout}: fresh {fresh_s:.2f} s +{fresh_mib:.0f} MiB, "
              f"reusing {reuse_s:.2f} s +{reuse_mib:.0f} MiB")


if __name__ == "__main__":
    main()
