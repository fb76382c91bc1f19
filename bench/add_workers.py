"""`copydet index add` on 1 and more workers: wall time, images/s and the same answers.

    python bench/add_workers.py INDEX FOLDER [--workers 1 2] [--threads 1] [--compare 64] [--work DIR]

Each worker count adds FOLDER to its own hard-linked copy of INDEX as the CLI does, in its own
process (imports, models and, beyond one worker, the embedded local Ray and its actors included).
With ``--threads 1`` every worker embeds on one thread (``OMP_NUM_THREADS=1``), so the speed-up is
how the chunks spread over workers; ``--threads 0`` leaves torch its default (one process then
uses every core). Figures: the speed-up over the first count, and the first ``--compare`` images of
FOLDER answered from the first count's index and each other's (identical reference lists, largest
score difference).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from index_add import cli, compare_answers

from core.imageio import list_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index")
    p.add_argument("folder")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="threads per worker (0: torch's default)")
    p.add_argument("--compare", type=int, default=64, help="images of FOLDER answered from every index")
    p.add_argument("--work", default="runs/bench_add_workers")
    args = p.parse_args()
    work, images = Path(args.work), list_images(args.folder)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI's torch, and Ray's workers, inherit it
    walls = {}
    for n in args.workers:
        index = work / f"workers{n}"
        shutil.rmtree(index, ignore_errors=True)
        shutil.copytree(args.index, index, copy_function=os.link)
        walls[n] = cli("index", "add", str(index), args.folder, "--set", f"index.num_workers={n}")
    first = args.workers[0]
    for n, wall in walls.items():
        print(f"{n} worker(s): {wall:.1f} s, {len(images) / wall:.2f} images/s, speed-up {walls[first] / wall:.2f}")
    asked = [path for _, path in images[:args.compare]]
    for n in args.workers[1:]:
        same, worst, k = compare_answers(work / f"workers{first}", work / f"workers{n}", asked)
        print(f"{n} worker(s) vs {first}: {same}/{len(asked)} identical top-{k} reference lists, "
              f"largest score difference {worst:.2e}")


if __name__ == "__main__":
    main()
