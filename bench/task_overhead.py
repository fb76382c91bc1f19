"""What ``run_tasks`` costs the driver per task: trivial Ray tasks at growing counts; and what
an actor (a search shard, a model replica) costs to start.

    python bench/task_overhead.py [--tasks 1000 4000 16000 --cpus 2 --actors 5]

Each size submits ``n`` tasks that return at once and collects them with the stages' own
:func:`jobs.runtime.run_tasks` (progress bar and all). The task bodies cost nothing, so what is
timed is Ray's scheduling and the driver's collecting: linear work grows ~4x per 4x; a loop that
scans every pending result for each one that finishes grows ~16x.

Every actor gets a new worker process, which runs copydet's worker setup hook before anything
else. The actors part starts ``--actors`` empty actors one at a time and times each to its first
answer, then as many that import timm (and so torch) first: what each actor paid while the hook's
module imported them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import ray

from jobs.config import RayConfig
from jobs.runtime import init_ray, run_tasks


def nothing(i: int) -> int:
    return i


class Empty:
    def __init__(self, imports: str | None = None) -> None:
        if imports:
            importlib.import_module(imports)

    def ping(self) -> int:
        return os.getpid()


def actor_seconds(n: int, imports: str | None = None) -> float:
    """Mean seconds from asking for an actor to its first answer, ``n`` actors one at a time."""
    total = 0.0
    for _ in range(n):
        start = time.perf_counter()
        actor = ray.remote(Empty).options(num_cpus=0).remote(imports)
        ray.get(actor.ping.remote())
        total += time.perf_counter() - start
        ray.kill(actor)
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=5, help="actors started for the start-up figure (0: none)")
    args = parser.parse_args()
    init_ray(RayConfig(num_cpus=args.cpus))
    run_tasks(nothing, [(i,) for i in range(200)], "warm-up")  # workers started before timing
    last = None
    for n in args.tasks:
        start = time.perf_counter()
        results = run_tasks(nothing, [(i,) for i in range(n)], f"{n} tasks")
        seconds = time.perf_counter() - start
        assert sorted(results) == list(range(n))
        ratio = f"  x{seconds / last[1]:.1f} for x{n / last[0]:.0f} tasks" if last else ""
        print(f"{n:>7} tasks: {seconds:7.2f} s, {1e3 * seconds / n:.2f} ms per task{ratio}", flush=True)
        last = (n, seconds)
    if args.actors:
        empty, heavy = actor_seconds(args.actors), actor_seconds(args.actors, "timm")
        print(f"actor start-up: {empty:.2f} s; importing timm and torch first: {heavy:.2f} s (x{heavy / empty:.1f})")
    ray.shutdown()


if __name__ == "__main__":
    main()
