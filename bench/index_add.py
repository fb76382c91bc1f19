"""`copydet index add` of a fraction more references against a full rebuild: wall time and answers.

    python bench/index_add.py CONFIG --data ROOT [--fraction 0.1] [--compare 100] [--work DIR] [--set K=V ...]

With ROOT in the ISC21 layout (references/, train/, queries/): the references sorted by id are
split into the first ``1 - fraction`` and the rest. One index is built from the first part
(``--reuse``: kept from an earlier run of the same work folder); then ``copydet index add`` adds
the rest to a copy of it (timed), another index is built from all of them at once (``copydet
index build``, timed: the full rebuild), and the add is timed again on a second copy, so that a
change of machine load during the run shows as two different add times. Every command runs as
the CLI does, in its own process (imports, models and, for the build, local Ray included). Then the first
``--compare`` queries are answered from both indexes: how many top-k lists are identical and the
largest score difference. Figure: add / rebuild wall time (target <= 0.15) and identical answers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core.imageio import list_images, load_rgb

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> float:
    """Run ``copydet ARGS`` in its own process; its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, check=True)
    return time.perf_counter() - t0


def linked(folder: Path, files: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True)
    for image_id, path in files:
        (folder / Path(path).name).symlink_to(path)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--data", required=True, help="ISC21-layout folder (references/, train/, queries/)")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--compare", type=int, default=100, help="queries answered from both indexes")
    p.add_argument("--work", default="runs/bench_index_add")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--reuse", action="store_true", help="keep the first build of an earlier run in --work")
    args = p.parse_args()
    root, work = Path(args.data), Path(args.work)
    refs = list_images(root / "references")
    cut = int(round(len(refs) * (1 - args.fraction)))
    sets = sum((["--set", s] for s in args.set), [])
    common = ["--train", str(root / "train"), *sets]
    if not (args.reuse and (work / "base" / "CURRENT").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        linked(work / "first", refs[:cut])
        cli("index", "build", args.config, "--out", str(work / "base"), "--references", str(work / "first"), *common)
    for name, files in (("extra", refs[cut:]), ("all", refs)):
        shutil.rmtree(work / name, ignore_errors=True)
        linked(work / name, files)
    for name in ("added", "added2", "rebuilt"):
        shutil.rmtree(work / name, ignore_errors=True)
    shutil.copytree(work / "base", work / "added", copy_function=os.link)
    shutil.copytree(work / "base", work / "added2", copy_function=os.link)
    add = cli("index", "add", str(work / "added"), str(work / "extra"))
    rebuild = cli("index", "build", args.config, "--out", str(work / "rebuilt"), "--references", str(work / "all"),
                  *common)
    add2 = cli("index", "add", str(work / "added2"), str(work / "extra"))
    print(f"references: {len(refs)} ({cut} in the first build, {len(refs) - cut} added = {args.fraction:.0%})")
    print(f"index add of {len(refs) - cut}: {add:.1f} s before the rebuild, {add2:.1f} s after it; "
          f"full rebuild of {len(refs)}: {rebuild:.1f} s")
    print(f"ratio add/rebuild: {add / rebuild:.3f} and {add2 / rebuild:.3f} (mean {(add + add2) / 2 / rebuild:.3f})")

    queries = [path for _, path in list_images(root / "queries")[: args.compare]]
    same, worst, k = compare_answers(work / "added", work / "rebuilt", queries)
    print(f"answers: {same}/{len(queries)} queries with identical top-{k} reference lists; "
          f"largest score difference {worst:.2e}")


def compare_answers(a_root: Path, b_root: Path, images: list[str]) -> tuple[int, float, int]:
    """``images`` answered from two indexes: how many identical reference lists, the largest score
    difference, and the lists' length (fuse.k)."""
    from jobs.serve.engine import Matcher
    a, b = Matcher(str(a_root)), Matcher(str(b_root))
    same, worst = 0, 0.0
    for start in range(0, len(images), 16):
        batch = [load_rgb(path) for path in images[start:start + 16]]
        for x, y in zip(a.match(batch), b.match(batch)):
            same += [m["reference_id"] for m in x["matches"]] == [m["reference_id"] for m in y["matches"]]
            worst = max([worst, *(abs(m["score"] - n["score"]) for m, n in zip(x["matches"], y["matches"]))])
    return same, worst, a.cfg.fuse.k

if __name__ == "__main__":
    main()
