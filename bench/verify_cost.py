"""Verification cost: seconds per pair of each scorer on the same pairs, in one process.

    python bench/verify_cost.py RUN_FOLDER [--scorers rootsift,learned --queries 256 --top-k 10 \
        --model copydet-verifier --rounds 2 --config configs/balanced.yaml]

Takes the first ``--queries`` queries of a run's ``fused.parquet`` (its manifest gives the paths),
and times the verify stage's own work with each of ``--scorers`` on their top-k pairs: the queries
cut into the stage's tasks for that scorer (``SCORER_PLANS[...].queries_per_task``), each task a
fresh scorer built as the stage builds it from ``--config``'s ``verify`` settings (image sides,
mirror; the defaults without one) running :func:`ensemble.verify.verify_pairs`; one thread, the
scorers interleaved round by round so that a shared machine's load falls on both alike. Prints
seconds per pair and per query of each, and each one's time over the first's (the learned
verifier's target: under 1/3 of the keypoint scorer's).
"""
from __future__ import annotations

import argparse
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch
from threadpoolctl import threadpool_limits

from core.imageio import load_rgb
from core.store import chunks, read_table
from ensemble.fuse import top_k_per_query
from ensemble.verify import verify_pairs
from jobs.config import load_config
from jobs.layout import RunDir
from jobs.layout import paths_of
from jobs.stages.verify import SCORER_PLANS, scorer_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--scorers", default="rootsift,learned", help="comma-separated; ratios are to the first")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--model", default="copydet-verifier")
    ap.add_argument("--registry", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=None, help="pipeline config whose verify settings build the scorers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)  # one BLAS thread (the SIFT matcher's distances), as in a Ray task
    run = RunDir(args.run)
    overrides = [f"verify.learned.model={args.model}"] + ([f"registry={args.registry}"] if args.registry else [])
    cfg = load_config(args.config, overrides)
    fused = read_table(run.fused)
    queries = sorted(set(fused.column("query_id").to_pylist()))[: args.queries]
    pairs = top_k_per_query(fused.filter(pc.is_in(fused.column("query_id"), pa.array(queries))), args.top_k)
    paths = {split: paths_of(run, split, pairs.column(col).to_pylist())
             for split, col in (("query", "query_id"), ("reference", "reference_id"))}
    seconds = dict.fromkeys(args.scorers.split(","), 0.0)
    for _ in range(args.rounds):
        for name in seconds:
            t0 = time.perf_counter()
            for _, a, b in chunks(len(queries), SCORER_PLANS[name].queries_per_task):
                task = pairs.filter(pc.is_in(pairs.column("query_id"), pa.array(queries[a:b])))
                scorer = scorer_for(name, cfg)  # fresh, as a task has
                verify_pairs(task, paths["query"], paths["reference"], args.top_k, load_rgb, scorer=scorer)
            seconds[name] += time.perf_counter() - t0
    n = pairs.num_rows * args.rounds
    first = next(iter(seconds))
    for name, s in seconds.items():
        print(f"{name:8s} {s / n:.4f} s/pair  {s / (len(queries) * args.rounds):.3f} s/query  "
              f"{s / seconds[first]:.2f} x {first}")
    print(f"({pairs.num_rows} pairs of {len(queries)} queries, {args.rounds} rounds, 1 thread)")


if __name__ == "__main__":
    main()
