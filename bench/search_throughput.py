"""Search throughput: copydet's search stage against a bare faiss IndexFlatIP, and approximate vs exact.

    python bench/search_throughput.py [--references 100000 --queries 5000 --dim 256 --k 10]

Same synthetic vectors for every row (bench/synthetic.py), measured in one run:

* bare: ``faiss.IndexFlatIP`` built on the arrays, ``search(queries, k)``;
* copydet: the search stage's path — reference features read from Parquet by a
  ``ShardedIndex`` actor, queries fanned out and merged, candidates table built;
  the ratio copydet / bare queries/s is the figure (target >= 0.8);
* approximate shards (HNSW, IVF-PQ; ``exact_max=1`` forces them): recall@10 against the exact
  top-10, how often the copy's source is found, and queries/s against the exact stage.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import ray
from synthetic import copies, descriptors, write_references

from ensemble.sharded import ShardedIndex, hits_table

from core.knn import IndexSpec


def bare(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k ids with a bare IndexFlatIP: ``(ids, build_s, search_s)``."""
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    t1 = time.perf_counter()
    _, ids = index.search(q, k)
    return ids, t1 - t0, time.perf_counter() - t1


def stage(files: list[str], q: np.ndarray, k: int, spec: IndexSpec, rows: int,
          cpus: int) -> tuple[np.ndarray, float, float]:
    """Top-k reference ids through the search stage's sharded index (one shard actor on
    ``cpus`` CPUs, i.e. ``search.cpus_per_shard``): ``(ids, build_s, search_s)``."""
    t0 = time.perf_counter()
    index = ShardedIndex(files, spec, shard_size=rows, k_max=k, actor_options={"num_cpus": cpus})
    index.info()  # waits until the shard has read its rows and built its index
    t1 = time.perf_counter()
    hits = index.search(q, k)
    queries = pa.table({"image_id": [f"Q{i}" for i in range(len(q))], "patch_id": pa.array([0] * len(q), pa.int32())})
    table = hits_table(queries, hits, "synthetic")
    search_s = time.perf_counter() - t1
    index.close()
    ids = np.array([int(r[1:]) for r in table.column("reference_id").to_pylist()]).reshape(len(q), -1)
    return ids, t1 - t0, search_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--references", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs; best search time of each")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    rng = np.random.default_rng(0)
    x = descriptors(args.references, args.dim, rng)
    q, source = copies(x, args.queries, rng)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_references(x, tmp)
        best = {"bare": np.inf, "stage": np.inf}
        for _ in range(args.repeats):  # alternate: the machine may be shared
            truth, bare_build, s = bare(x, q, args.k)
            best["bare"] = min(best["bare"], s)
            ids, stage_build, s = stage(files, q, args.k, IndexSpec(), args.references, cores)
            best["stage"] = min(best["stage"], s)
        same = float(np.mean(ids == truth))
        print(f"{args.references} x {args.dim}-d references, {args.queries} queries, k={args.k}, {cores} cores")
        print(f"  bare IndexFlatIP   {args.queries / best['bare']:8.0f} queries/s  (build {bare_build:.2f} s)")
        print(f"  copydet search     {args.queries / best['stage']:8.0f} queries/s  (read+build {stage_build:.2f} s)"
              f"  same top-{args.k} {same:.3f}")
        print(f"  ratio copydet / bare: {best['bare'] / best['stage']:.2f}")
        print("approximate shards vs exact:")
        for name, spec in [("HNSW M=32 ef=128", IndexSpec(exact_max=1, kind="hnsw")),
                           ("IVF-PQ 1024x32 nprobe 32 + SQ8 re-rank", IndexSpec(exact_max=1, nlist=1024, nprobe=32, pq_m=32))]:
            ids, build, s = stage(files, q, args.k, spec, args.references, cores)
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, truth)])
            found = np.mean([s_ in set(a) for a, s_ in zip(ids, source)])
            print(f"  {name:<26} recall@{args.k} {recall:.3f}  source found {found:.3f}  "
                  f"{args.queries / s:8.0f} queries/s ({best['stage'] / s:.2f}x exact)  build {build:.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
