"""`copydet index match` on 1 and more replicas: wall time, images/s and identical answers.

    python bench/match_replicas.py INDEX FOLDER [--replicas 1 2] [--threads 1] [--work DIR]

Each replica count runs as the CLI does, in its own process (imports, models and, beyond one
replica, the embedded local Ray and its actors included), into a fresh ``--out``. With
``--threads 1`` every replica embeds on one torch thread, so the speed-up is how the windows
spread over workers; ``--threads 0`` leaves torch its default (one process then uses every core).
Figures: the speed-up over the first count (close to the count while each replica has a core of
its own) and whether every count wrote the same matches.csv, byte for byte.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from index_add import cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index")
    p.add_argument("folder")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (0: torch's default)")
    p.add_argument("--work", default="runs/bench_match_replicas")
    args = p.parse_args()
    work = Path(args.work)
    images = sum(1 for f in Path(args.folder).iterdir() if f.is_file())
    threads = ["--set", f"serve.num_threads={args.threads}"] if args.threads else []
    walls, answers = {}, set()
    for n in args.replicas:
        out = work / f"replicas{n}"
        shutil.rmtree(out, ignore_errors=True)
        walls[n] = cli("index", "match", args.index, args.folder, "--out", str(out),
                       "--set", f"serve.num_replicas={n}", *threads)
        answers.add((out / "matches.csv").read_bytes())
    first = args.replicas[0]
    for n, wall in walls.items():
        print(f"{n} replica(s): {wall:.1f} s, {images / wall:.2f} images/s, speed-up {walls[first] / wall:.2f}")
    print(f"matches.csv: {'identical' if len(answers) == 1 else 'DIFFERENT'} for every replica count")


if __name__ == "__main__":
    main()
