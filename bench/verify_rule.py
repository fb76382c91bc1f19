"""Pick the learned verifier's bonus rule on a validation run (a synthetic split, never dev/hard).

    python bench/verify_rule.py RUN_FOLDER GROUND_TRUTH [--config configs/sscd.yaml] [--keypoints rootsift]

RUN_FOLDER has ``fused.parquet`` and the verify stage's caches ``verify.parquet/<keypoints>`` and
``verify.parquet/learned`` (run ``copydet verify`` with ``verify.method=learned+rootsift`` on it).
Every rule of a small grid (method, ``learned.floor``, ``learned.weight``, ``combine``; the
keypoint bonus keeps the config's settings) re-scores the fused predictions with the stage's own
:func:`jobs.stages.verify.rescore` and ``fuse.demote_others``; prints μAP / R@P90 / R@1 of each,
then the best setting of ``learned`` and of ``learned+<keypoints>`` (μAP, ties to the smaller weight).
"""
from __future__ import annotations

import argparse
import itertools

from core.metrics import evaluate_table, read_ground_truth
from core.store import read_table
from ensemble.fuse import demote_others
from jobs.config import load_config
from jobs.layout import RunDir
from jobs.stages.verify import read_cache, rescore

FLOORS = (0.0, 0.25, 0.5, 0.75, 0.9)
WEIGHTS = (0.25, 0.5, 1.0)
COMBINES = ("max", "sum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("ground_truth")
    ap.add_argument("--config", default="configs/sscd.yaml")
    ap.add_argument("--keypoints", default="rootsift", help="the keypoint scorer combined with the learned one")
    args = ap.parse_args()
    run, gt = RunDir(args.run), read_ground_truth(args.ground_truth)
    fused = read_table(run.fused)
    both = f"learned+{args.keypoints}"
    checked = {name: read_cache(run, name) for name in ("learned", args.keypoints)}
    share = load_config(args.config).fuse.demote_others

    def measure(method: str, **learned: object) -> tuple[float, float, float]:
        sets = [f"verify.{'' if k == 'combine' else 'learned.'}{k}={v}" for k, v in learned.items()]
        cfg = load_config(args.config, ["verify.enabled=true", f"verify.method={method}", *sets]).verify  # validated
        pred = rescore(fused, {k: v for k, v in checked.items() if k in method.split("+")}, cfg)
        m = evaluate_table(gt, demote_others(pred, share))
        return m.micro_ap, m.recall_at_p90, m.recall_at_1

    rows = [("none", {}, measure("learned", weight=0.0)), (args.keypoints, {}, measure(args.keypoints))]
    for floor, weight in itertools.product(FLOORS, WEIGHTS):
        rows.append(("learned", {"floor": floor, "weight": weight}, measure("learned", floor=floor, weight=weight)))
        for combine in COMBINES:
            s = {"floor": floor, "weight": weight, "combine": combine}
            rows.append((both, s, measure(both, **s)))
    for method, s, (uap, rp90, r1) in rows:
        print(f"{method:17s} {str(s):52s} μAP {uap:.4f}  R@P90 {rp90:.4f}  R@1 {r1:.4f}")
    for method in ("learned", both):
        best = max((r for r in rows if r[0] == method), key=lambda r: (r[2][0], -r[1]["weight"]))
        print(f"best {method}: {best[1]} -> μAP {best[2][0]:.4f} R@P90 {best[2][1]:.4f} R@1 {best[2][2]:.4f}")


if __name__ == "__main__":
    main()
