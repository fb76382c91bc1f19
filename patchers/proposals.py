"""Pixel-dependent views: selective-search region proposals and detector boxes, merged.

Geometric views (``patchers.views``) are the same for every image; proposals are not. Each
proposal or detection becomes a :class:`~patchers.views.View` of kind ``proposal`` or
``detection`` that keeps its source score. :func:`merge_boxes` applies non-maximum
suppression, drops boxes that a geometric view already covers, and enforces the budget.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, nms

from patchers.views import Box, View

# Detections are ranked before proposals: a detector box beats any proposal it overlaps.
SOURCE_PRIORITY = {"detection": 1.0, "proposal": 0.0}


@dataclass(frozen=True)
class ProposalParams:
    """Tuning knobs of the proposal step (fractions are of the image side)."""

    side: int = 256          # selective search runs on the image downscaled to this long side
    min_size: float = 0.1    # drop boxes narrower or shorter than this
    max_area: float = 0.9    # drop boxes nearly as large as the image (the full view covers them)
    nms_iou: float = 0.7     # NMS between proposals / detections
    dedup_iou: float = 0.8   # drop boxes this close to a geometric view
    conf: float = 0.25       # detector confidence threshold


def selective_search(img: Image.Image, budget: int, params: ProposalParams = ProposalParams()
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``4 * budget`` fast-mode selective-search boxes as ``(n, 4)`` fractions
    ``x0, y0, x1, y1``, largest first, with rank scores in (0, 1].

    OpenCV returns the same set of boxes in a random order; sorting by area (then position)
    makes the kept boxes reproducible, and the large regions a pasted copy occupies go first.
    """
    w, h = img.size
    f = min(1.0, params.side / max(w, h))
    small = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
    bgr = np.ascontiguousarray(np.asarray(small)[:, :, ::-1])
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    ss.switchToSelectiveSearchFast()
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)
    order = np.lexsort((rects[:, 1], rects[:, 0], rects[:, 3], rects[:, 2], -rects[:, 2] * rects[:, 3]))
    rects = rects[order[: 4 * budget]]
    sw, sh = small.size
    boxes = np.stack([rects[:, 0] / sw, rects[:, 1] / sh,
                      (rects[:, 0] + rects[:, 2]) / sw, (rects[:, 1] + rects[:, 3]) / sh], axis=1)
    scores = 1.0 - np.arange(len(boxes), dtype=np.float32) / max(len(boxes), 1)
    return np.clip(boxes, 0.0, 1.0), scores


def merge_boxes(boxes: np.ndarray | Sequence[Box], scores: Sequence[float], sources: Sequence[str],
                iou: float = 0.7, budget: int | None = None, against: Sequence[Box] = (),
                dedup_iou: float = 0.8, min_size: float = 0.0, max_area: float = 1.0) -> list[View]:
    """Merge proposal/detection boxes (fractions) into views, best first.

    Boxes smaller than ``min_size`` on a side or larger than ``max_area`` are dropped; the rest
    go through NMS at ``iou`` (detections ranked before proposals, then by score); a box whose
    IoU with any box of ``against`` (the geometric views) exceeds ``dedup_iou`` is dropped;
    at most ``budget`` proposals are kept (detections are not capped here: the plan's
    ``max_patches`` bounds everything).
    """
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1))
    if not (len(b) == len(s) == len(sources)):
        raise ValueError(f"merge_boxes: {len(b)} boxes, {len(s)} scores, {len(sources)} sources")
    unknown = set(sources) - set(SOURCE_PRIORITY)
    if unknown:
        raise ValueError(f"merge_boxes: unknown source(s) {sorted(unknown)}; known: {list(SOURCE_PRIORITY)}")
    wh = b[:, 2:] - b[:, :2]
    keep = (wh.min(dim=1).values >= min_size) & (wh.prod(dim=1) <= max_area) & (wh.min(dim=1).values > 0)
    idx = torch.nonzero(keep).flatten()
    if len(idx) == 0:
        return []
    rank = s[idx] + 2.0 * torch.tensor([SOURCE_PRIORITY[sources[i]] for i in idx.tolist()])
    idx = idx[nms(b[idx], rank, iou)]  # nms returns indices sorted by decreasing rank
    if against:
        near = box_iou(b[idx], torch.tensor(against, dtype=torch.float32)).max(dim=1).values
        idx = idx[near <= dedup_iou]
    out, n_prop = [], 0
    for i in idx.tolist():
        if sources[i] == "proposal":
            if budget is not None and n_prop >= budget:
                continue
            n_prop += 1
        out.append(View(sources[i], tuple(float(c) for c in b[i]), score=float(s[i])))
    return out


def image_views(img: Image.Image, geometric: Sequence[View], proposals: int,
                detections: tuple[np.ndarray, np.ndarray] | None = None,
                params: ProposalParams = ProposalParams()) -> list[View]:
    """Proposal and detection views of one image, merged and deduplicated against the
    un-rotated, un-flipped ``geometric`` views."""
    parts = []
    if proposals > 0:
        pb, ps = selective_search(img, proposals, params)
        parts.append((pb, ps, ["proposal"] * len(pb)))
    if detections is not None and len(detections[0]):
        db, ds = detections
        keep = ds >= params.conf
        parts.append((db[keep], ds[keep], ["detection"] * int(keep.sum())))
    if not parts:
        return []
    boxes = np.concatenate([p[0] for p in parts]).reshape(-1, 4)
    scores = np.concatenate([p[1] for p in parts])
    sources = [src for p in parts for src in p[2]]
    against = [v.box for v in geometric if v.rotation == 0 and not v.flip]
    return merge_boxes(boxes, scores, sources, iou=params.nms_iou, budget=proposals, against=against,
                       dedup_iou=params.dedup_iou, min_size=params.min_size, max_area=params.max_area)
