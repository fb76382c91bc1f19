"""Pick the keypoint silence penalty on validation runs (synthetic splits, never dev/hard).

    python bench/verify_penalty.py RUN_FOLDER GROUND_TRUTH [RUN_FOLDER GROUND_TRUTH ...]

Each RUN_FOLDER has ``fused.parquet`` and the verify stage's ``verify.parquet/sift`` cache (with
its ``keypoints`` column). Every (``verify.penalty``, ``verify.penalty_keypoints``) of a small
grid re-scores the fused predictions with the stage's own :func:`jobs.stages.verify.rescore`
(the rest of the run's ``verify`` settings kept); prints each run's μAP and the mean over runs,
best first (ties to the smaller penalty).
"""
from __future__ import annotations

import argparse
import itertools

import pyarrow as pa

from core.metrics import evaluate, read_ground_truth
from core.store import join, list_shards, read_table
from jobs.config import load_config
from jobs.layout import RunDir
from jobs.stages.verify import rescore

PENALTIES = (0.05, 0.1, 0.2)
KEYPOINTS = (100, 200, 400, 800)
GRID = [(0.0, KEYPOINTS[-1]), *itertools.product(PENALTIES, KEYPOINTS)]  # (0, _): no penalty


def run_micro_ap(folder: str, ground_truth: str) -> dict[tuple[float, int], float]:
    """(penalty, penalty_keypoints) -> μAP of one run re-scored with it."""
    run, gt = RunDir(folder), read_ground_truth(ground_truth)
    fused = read_table(run.fused)
    sift = pa.concat_tables([read_table(s) for s in list_shards(join(run.verify, "sift"))])
    base = load_config(join(folder, "config.yaml"), ["verify.method=sift"]).verify
    out = {}
    for penalty, keypoints in GRID:
        cfg = base.model_copy(update={"penalty": penalty, "penalty_keypoints": keypoints})
        pred = rescore(fused, {"sift": sift}, cfg)
        out[(penalty, keypoints)] = evaluate(gt, pred.column("query_id").to_numpy(zero_copy_only=False),
                                             pred.column("reference_id").to_numpy(zero_copy_only=False),
                                             pred.column("score").to_numpy()).micro_ap
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="RUN_FOLDER GROUND_TRUTH pairs")
    args = ap.parse_args()
    if len(args.runs) % 2:
        ap.error("give RUN_FOLDER GROUND_TRUTH pairs")
    pairs = list(zip(args.runs[::2], args.runs[1::2]))
    tables = [run_micro_ap(folder, gt) for folder, gt in pairs]
    mean = {s: sum(t[s] for t in tables) / len(tables) for s in tables[0]}
    print("penalty keypoints  " + "  ".join(f"run{i}" for i in range(len(tables))) + "    mean")
    for s in sorted(mean, key=lambda s: (-round(mean[s], 6), s[0], -s[1])):
        print(f"{s[0]:<7g} {s[1]:<9d}  " + "  ".join(f"{t[s]:.4f}" for t in tables) + f"  {mean[s]:.4f}")


if __name__ == "__main__":
    main()
