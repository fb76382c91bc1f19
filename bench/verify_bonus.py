"""Pick the keypoint bonus's settings on validation runs (synthetic splits, never dev/hard).

    python bench/verify_bonus.py RUN_FOLDER GROUND_TRUTH [RUN_FOLDER GROUND_TRUTH ...] \
        [--grid KEY=V1,V2,...]...

Each RUN_FOLDER has ``fused.parquet`` and the verify stage's caches of its method's scorers
(``verify.parquet/<scorer>``; keypoint caches with their ``keypoints`` column). Every combination of
the grid's ``verify.*`` values re-scores the fused predictions with the stage's own
:func:`jobs.stages.verify.rescore` (the run's other ``verify`` settings kept); prints each run's μAP
and the mean over runs, best first (ties to the earlier grid point: give each key's values mildest
first). The default grid is the one ``verify.penalty`` and ``verify.penalty_keypoints`` were chosen
on.
"""
from __future__ import annotations

import argparse
import itertools

from core.metrics import evaluate_table, read_ground_truth
from core.store import join, read_table
from jobs.config import load_config
from jobs.layout import RunDir
from jobs.stages.verify import VERIFY_METHODS, read_cache, rescore

DEFAULT_GRID = {"penalty": [0.0, 0.05, 0.1, 0.2], "penalty_keypoints": [100, 200, 400, 800]}
Point = tuple[float, ...]


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """``KEY=V1,V2`` items -> {key: values}; values stay ints where they look like ints."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        grid[key] = [int(v) if v.lstrip("-").isdigit() else float(v) for v in values.split(",")]
    return grid


def grid_points(grid: dict[str, list[float]]) -> list[Point]:
    """Every combination of the grid's values, less those that repeat another: without a penalty,
    ``penalty_keypoints`` has no effect, so only its first value is kept there."""
    keys = list(grid)
    points = []
    for point in itertools.product(*grid.values()):
        values = dict(zip(keys, point))
        if values.get("penalty") == 0 and "penalty_keypoints" in values \
                and values["penalty_keypoints"] != grid["penalty_keypoints"][0]:
            continue
        points.append(point)
    return points


def run_micro_ap(folder: str, ground_truth: str, grid: dict[str, list[float]]) -> dict[Point, float]:
    """Grid point -> μAP of one run re-scored with it."""
    run, gt = RunDir(folder), read_ground_truth(ground_truth)
    fused = read_table(run.fused)
    base = load_config(join(folder, "config.yaml")).verify
    checked = {name: read_cache(run, name) for name in VERIFY_METHODS[base.method].scorers}
    out = {}
    for point in grid_points(grid):
        pred = rescore(fused, checked, base.model_copy(update=dict(zip(grid, point))))
        out[point] = evaluate_table(gt, pred).micro_ap
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="RUN_FOLDER GROUND_TRUTH pairs")
    ap.add_argument("--grid", action="append", default=[], help="verify key and its values, e.g. penalty=0,0.05,0.1")
    args = ap.parse_args()
    if len(args.runs) % 2:
        ap.error("give RUN_FOLDER GROUND_TRUTH pairs")
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    tables = [run_micro_ap(folder, gt, grid) for folder, gt in zip(args.runs[::2], args.runs[1::2])]
    order = list(tables[0])
    mean = {p: sum(t[p] for t in tables) / len(tables) for p in order}
    widths = [max(8, len(k)) for k in grid]
    print("  ".join(f"{k:>{w}}" for k, w in zip(grid, widths)) + "  " +
          "  ".join(f"{f'run{i}':>6}" for i in range(len(tables))) + "    mean")
    for p in sorted(order, key=lambda p: (-round(mean[p], 6), order.index(p))):
        print("  ".join(f"{v:>{w}g}" for v, w in zip(p, widths)) + "  " + "  ".join(f"{t[p]:.4f}" for t in tables)
              + f"  {mean[p]:.4f}")


if __name__ == "__main__":
    main()
