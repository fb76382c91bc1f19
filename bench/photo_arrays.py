"""Memory of the learned verifier's per-photo tokens: stacked in memory vs `pretrain.photo_arrays`.

    python bench/photo_arrays.py [--photos 100000 --regions 15 --dim 128]

Each way runs in its own process: ``--photos`` rows of ``regions x dim`` float32 tokens are made
(constant values: no model runs), then 50 training batches of 96 random rows are read. Printed:
peak resident memory and the anonymous memory (heap: what cannot be given back) at the end. A
memory-mapped file's pages are file-backed page cache, which the kernel reclaims under pressure.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pretrain.photo_arrays import photo_array


def measure(mode: str, n: int, regions: int, dim: int) -> str:
    def rows(a: int, b: int) -> np.ndarray:
        return np.ones((b - a, regions, dim), np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        if mode == "stacked":  # what describe_photos over all photos held before
            x = np.stack([rows(i, i + 1)[0] for i in range(n)])
        else:
            x = photo_array(Path(tmp) / "tokens.npy", "bench", n, rows)
        picks = np.random.default_rng(0).integers(0, n, (50, 96))
        total = sum(float(x[p].sum()) for p in picks)
        anon = next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return f"{mode:14s} {x.nbytes / 2**20:8.0f} MiB of tokens | peak RSS {peak:6.0f} MiB | " \
               f"anonymous at the end {int(anon) / 1024:6.0f} MiB (checksum {total:.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=100_000)
    p.add_argument("--regions", type=int, default=15)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--mode", choices=["stacked", "memory-mapped"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(measure(args.mode, args.photos, args.regions, args.dim))
        return
    for mode in ("stacked", "memory-mapped"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--photos", str(args.photos),
                        "--regions", str(args.regions), "--dim", str(args.dim)], check=True)


if __name__ == "__main__":
    main()
