"""Manifest rows -> patch rows (the ``patches`` contract of DESIGN.md).

Geometric views are the same for every image (:func:`plan_table`); a side that asks for
region proposals or a detector needs the pixels (:func:`plan_images`), and its extra views
come after the geometric ones, so ``max_patches`` trims proposals first.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from core.contracts import PATCHES_SCHEMA
from core.imageio import ImageDecodeError, load_rgb
from patchers.proposals import ProposalParams, image_views
from patchers.views import View, ViewConfig, plan_views


@dataclass(frozen=True)
class DetectorSpec:
    """A resolved detector: local weights and the input size it was trained at."""

    weights: str
    imgsz: int
    sha256: str | None = None  # content hash of the weights (pinned in the patch folder's settings)


def patch_rows(image_id: str, views: list[View]) -> list[dict]:
    """One row per view; patch ids follow plan order, so patch 0 is the full image."""
    return [{"image_id": image_id, "patch_id": i, "kind": v.kind,
             "x0": v.box[0], "y0": v.box[1], "x1": v.box[2], "y1": v.box[3],
             "rotation": v.rotation, "flip": v.flip, "source_score": v.score}
            for i, v in enumerate(views)]


def plan_table(image_ids: Iterable[str], cfg: ViewConfig) -> pa.Table:
    """Patch table for images whose views do not depend on their pixels."""
    views = plan_views(cfg)
    rows = [r for image_id in image_ids for r in patch_rows(image_id, views)]
    return pa.Table.from_pylist(rows, schema=PATCHES_SCHEMA)


def needs_pixels(cfg: ViewConfig) -> bool:
    """Whether this side's plan depends on image content (proposals or detections)."""
    return cfg.proposals > 0 or cfg.detector is not None


def plan_images(images: Sequence[tuple[str, str]], cfg: ViewConfig, detector: DetectorSpec | None = None,
                params: ProposalParams = ProposalParams(), batch: int = 16,
                max_pixels: int | None = None) -> tuple[pa.Table, list[str]]:
    """Patch table for ``(image_id, path)`` pairs, decoding each image for its proposals and
    detections. Images that no longer decode keep their geometric views; their paths are
    returned so the caller can report them."""
    geometric = plan_views(cfg)
    rows, failed = [], []
    for start in range(0, len(images), batch):
        decoded = []
        for image_id, path in images[start:start + batch]:
            try:
                decoded.append((image_id, load_rgb(path, max_pixels=max_pixels)))
            except ImageDecodeError:
                failed.append(path)
                rows.extend(patch_rows(image_id, geometric))
        rows.extend(plan_decoded(decoded, cfg, detector, params))
    return pa.Table.from_pylist(rows, schema=PATCHES_SCHEMA), failed


def plan_decoded(images: Sequence[tuple[str, Image.Image]], cfg: ViewConfig, detector: DetectorSpec | None = None,
                 params: ProposalParams = ProposalParams()) -> list[dict]:
    """Patch rows of decoded ``(image_id, image)`` pairs (geometric views, then proposals and
    detections when the side asks for them): one detector call for all of them."""
    geometric = plan_views(cfg)
    if not needs_pixels(cfg):
        return [r for image_id, _ in images for r in patch_rows(image_id, geometric)]
    dets = [None] * len(images)
    if detector is not None and images:
        from patchers.detector.predict import detect  # ultralytics only where a detector is used
        dets = detect([img for _, img in images], detector.weights, conf=params.conf, imgsz=detector.imgsz)
    rows = []
    for (image_id, img), d in zip(images, dets):
        extra = image_views(img, geometric, cfg.proposals, d, params)
        rows.extend(patch_rows(image_id, plan_views(cfg, extra)))
    return rows
