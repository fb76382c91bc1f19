"""Copy-region detector: box recall on real benchmark queries whose copy sits inside another image.

    python bench/detector_recall.py --detector copy-detector-cpu [--root ../shared/bench/minidisc-dev]

Analysis only: this script reads the benchmark's ``queries_meta.csv`` (it holds the answers)
to know which queries to score and where their copy is; no method ever sees it. Ground-truth
boxes, where they can be known:

* ``overlay_onto_screenshot``: AugLy's template box (its ``bboxes.json``) scaled to the query;
  the screenshot is the last geometric edit of a query, and later downscaling keeps fractions;
* ``paste_onto_background``, positive queries: the reference's corners mapped into the query
  by a SIFT + RANSAC homography (at least ``--min-inliers``), clipped to the image; later
  geometric edits (crops, rotations) are in that mapping too. Negative pasted queries have
  no reference to map, so they are left out.

Prints the box recall at IoU >= 0.5 per family (any detection, and the best-scored one only)
and the number of boxes the detector returns per query.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from core.augment.assets import SCREENSHOT_BBOXES, screenshot_template_path
from core.imageio import load_rgb
from ensemble.keypoints import describe, homography
from jobs.stages.patch import resolve_detector
from patchers.detector.predict import detect
from patchers.detector.train import matched


@lru_cache(maxsize=None)
def screenshot_box(template: str) -> np.ndarray:
    """The template's photo box as fractions of the template (= of the query)."""
    x0, y0, x1, y1 = json.loads(SCREENSHOT_BBOXES.read_text())[template]
    w, h = load_rgb(screenshot_template_path(template)).size
    return np.array([x0 / w, y0 / h, x1 / w, y1 / h], np.float32)


def mapped_box(reference: str, query: str, min_inliers: int) -> np.ndarray | None:
    """The reference's outline mapped into the query (fractions, clipped), or None if unsure."""
    ref, qry = load_rgb(reference), load_rgb(query)
    h, inliers = homography(describe(ref, max_side=max(ref.size), min_side=0),  # native pixel coordinates
                           describe(qry, max_side=max(qry.size), min_side=0))
    if h is None or inliers < min_inliers:
        return None
    w, hgt = ref.size
    corners = cv2.perspectiveTransform(np.float32([[[0, 0]], [[w, 0]], [[w, hgt]], [[0, hgt]]]), h).reshape(-1, 2)
    box = np.r_[corners.min(0) / qry.size, corners.max(0) / qry.size].clip(0, 1)
    return box.astype(np.float32) if (box[2] - box[0]) * (box[3] - box[1]) > 0.01 else None


def ground_truth(root: Path, references: Path, min_inliers: int) -> dict[str, tuple[str, np.ndarray]]:
    """query id -> (family, box) for the queries whose copy box can be known."""
    out = {}
    for row in csv.DictReader(open(root / "queries_meta.csv")):
        families = row["transforms"].split(";")
        params = dict(json.loads(row["params"]))
        query = str(root / "queries" / f"{row['query_id']}.jpg")
        if "overlay_onto_screenshot" in families:
            out[row["query_id"]] = ("overlay_onto_screenshot",
                                    screenshot_box(params["overlay_onto_screenshot"]["template"]))
        elif "paste_onto_background" in families and row["positive"] == "1":
            box = mapped_box(str(references / f"{row['reference_id']}.jpg"), query, min_inliers)
            if box is not None:
                out[row["query_id"]] = ("paste_onto_background", box)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", required=True, help="registry name of the detector")
    p.add_argument("--registry", default=None)
    p.add_argument("--root", default="../shared/bench/minidisc-dev", help="queries/ and queries_meta.csv")
    p.add_argument("--references", default=None, help="reference folder (default: ROOT/references)")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--min-inliers", type=int, default=15)
    args = p.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    root = Path(args.root)
    spec = resolve_detector(args.detector, args.registry)
    truth = ground_truth(root, Path(args.references or root / "references"), args.min_inliers)
    ids = sorted(truth)
    dets = detect([load_rgb(str(root / "queries" / f"{q}.jpg")) for q in ids], spec.weights,
                  conf=args.conf, imgsz=spec.imgsz)
    print(f"detector {args.detector} ({spec.weights}, imgsz {spec.imgsz}, conf {args.conf}) on {root}/queries")
    for family in ("paste_onto_background", "overlay_onto_screenshot", None):
        rows = [(truth[q][1], d) for q, d in zip(ids, dets) if family in (None, truth[q][0])]
        if not rows:
            continue
        anyhit = np.mean([matched(gt[None], boxes, args.iou)[0] for gt, (boxes, _) in rows])
        top = np.mean([matched(gt[None], boxes[:1], args.iou)[0] for gt, (boxes, _) in rows])
        per_query = np.mean([len(boxes) for _, (boxes, _) in rows])
        print(f"  {family or 'all':<24} queries {len(rows):3d}  recall@IoU{args.iou:g} {anyhit:.3f}  "
              f"top box only {top:.3f}  boxes/query {per_query:.1f}")


if __name__ == "__main__":
    main()
