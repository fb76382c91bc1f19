"""What ``run_tasks`` costs the driver per task: trivial Ray tasks at growing counts.

    python bench/task_overhead.py [--tasks 1000 4000 16000 --cpus 2]

Each size submits ``n`` tasks that return at once and collects them with the stages' own
:func:`jobs.runtime.run_tasks` (progress bar and all). The task bodies cost nothing, so what is
timed is Ray's scheduling and the driver's collecting: linear work grows ~4x per 4x; a loop that
scans every pending result for each one that finishes grows ~16x.
"""
from __future__ import annotations

import argparse
import time

import ray

from jobs.config import RayConfig
from jobs.runtime import init_ray, run_tasks


def nothing(i: int) -> int:
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--cpus", type=int, default=2)
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
    ray.shutdown()


if __name__ == "__main__":
    main()
