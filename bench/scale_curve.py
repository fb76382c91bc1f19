"""The cost curve of the whole pipeline on this machine: wall time per stage and the driver's
peak RSS at 2k, 8k and 32k references (queries a quarter of that, 1k train photos), with a
small model on synthetic photos. ``--verify K`` adds the verify stage (RootSIFT on each query's
top K), whose describe-once scratch holds one `verify.window` of queries at a time.

Linear scaling means a 4x larger set costs at most ~4x (time per 4x data <= 4.4x) while the
driver's memory stays flat (workers write, the driver only coordinates): both are printed.
Each size runs in a fresh process (its own local Ray), so peak RSS is the driver's alone.

    python bench/scale_curve.py --sizes 2000 8000 32000
    python bench/scale_curve.py --sizes 1000 4000 --verify 5
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("manifest", "patch", "extract", "search", "fuse")
DRIVER = """
import json, resource, sys, time
from core.logs import setup_logging
from jobs.config import load_config
from jobs.pipeline import run_stages
setup_logging()
cfg = load_config(sys.argv[2], sys.argv[3:])
timings = run_stages(cfg, json.loads(sys.argv[1]))
print("RESULT " + json.dumps({"timings": timings, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_photos(folder: Path, prefix: str, start: int, n: int) -> None:
    """``n`` distinct 96 x 72 synthetic photos (random colour fields with shapes), as JPEG."""
    from tests.conftest import synthetic_photo
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        synthetic_photo(i, (96, 72)).save(folder / f"{prefix}{i:06d}.jpg", quality=85)


def dataset(root: Path, references: int, queries: int, train: int) -> None:
    """An ISC21-layout folder; queries are JPEG re-encodings of references (half) or new photos."""
    from PIL import Image
    write_photos(root / "references", "R", 0, references)
    write_photos(root / "train", "T", 10_000_000, train)
    (root / "queries").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for q in range(queries):
        if q % 2:
            write_photos(root / "queries", "N", 20_000_000 + q, 1)
        else:
            r = int(rng.integers(references))
            Image.open(root / "references" / f"R{r:06d}.jpg").rotate(8).save(root / "queries" / f"Q{q:06d}.jpg", quality=60)


def run_size(root: Path, out: Path, stages: tuple[str, ...], sets: list[str]) -> dict:
    cmd = [sys.executable, "-c", DRIVER, json.dumps(stages), str(ROOT / "configs" / "smoke.yaml"), f"data.root={root}",
           f"output={out}", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000], help="reference counts")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--model", default="{name: tiny_cnn, scales: [32], batch_size: 256}")
    p.add_argument("--work", help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--verify", type=int, default=0, metavar="K", help="also verify each query's top K (0: no)")
    args = p.parse_args()
    sets = [f"models=[{args.model}]", "patches.shard_size=2000", "extract.chunk_patches=2048",
            "patches.query.preset=crops"]
    stages = STAGES + (("verify",) if args.verify else ())
    if args.verify:
        sets += ["verify.enabled=true", f"verify.top_k={args.verify}"]
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-curve-"))
    rows = []
    for size in sorted(args.sizes):
        root = work / f"data-{size}"
        if not (root / "queries").is_dir():
            t0 = time.perf_counter()
            dataset(root, size, size // 4, args.train)
            print(f"data {size}: written in {time.perf_counter() - t0:.0f} s", flush=True)
        shutil.rmtree(work / f"run-{size}", ignore_errors=True)  # a kept run folder would resume: nothing timed
        result = run_size(root, work / f"run-{size}", stages, sets)
        rows.append((size, result))
        t = result["timings"]
        print(f"{size:>7} refs {size // 4:>6} queries: " + "  ".join(f"{s} {t[s]:.1f}s" for s in stages)
              + f"  total {sum(t[s] for s in stages):.1f}s  driver peak RSS {result['peak_rss_mib']:.0f} MiB",
              flush=True)
    base = rows[0]
    for (a, ra), (b, rb) in zip(rows, rows[1:]):
        ta, tb = (sum(r["timings"][s] for s in stages) for r in (ra, rb))
        each = ", ".join(f"{s} x{rb['timings'][s] / ra['timings'][s]:.2f}"
                         for s in ("extract", "verify") if s in stages)
        print(f"{a} -> {b} ({b / a:.0f}x data): time x{tb / ta:.2f}, {each}, "
              f"driver RSS x{rb['peak_rss_mib'] / ra['peak_rss_mib']:.2f}")
    print(f"driver peak RSS {base[0]} -> {rows[-1][0]}: {base[1]['peak_rss_mib']:.0f} -> "
          f"{rows[-1][1]['peak_rss_mib']:.0f} MiB ({rows[-1][1]['peak_rss_mib'] / base[1]['peak_rss_mib'] - 1:+.0%})")


if __name__ == "__main__":
    main()
