"""Listing an image folder (:func:`core.imageio.scan_images`): time per file and peak memory.

    python bench/scan_folder.py [--files 200000] [--folder DIR]

Without ``--folder`` it makes ``--files`` empty ``.jpg`` files in a temporary folder (names as
in DISC21, ``R0000000.jpg``). Printed: files, seconds and microseconds a file (best of 3), and
the Python memory the scan holds at its end and at its peak (tracemalloc, a separate pass). The
manifest, ``index add``, training photo lists and synthetic splits all list folders this way.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from core.imageio import scan_images


def measure(folder: str) -> None:
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        n = len(scan_images(folder).files)
        seconds.append(time.perf_counter() - t0)
    tracemalloc.start()
    scan = scan_images(folder)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del scan
    best = min(seconds)
    print(f"{n} files: {best:.2f} s ({best / n * 1e6:.1f} us a file), held {held / 2**20:.0f} MiB, "
          f"peak {peak / 2**20:.0f} MiB ({peak / n:.0f} B a file)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--folder", help="an existing folder to list instead")
    args = ap.parse_args()
    if args.folder:
        measure(args.folder)
        return
    with tempfile.TemporaryDirectory(prefix="scan-") as tmp:
        for i in range(args.files):
            Path(tmp, f"R{i:07d}.jpg").touch()
        measure(tmp)


if __name__ == "__main__":
    main()
