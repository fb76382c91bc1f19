"""Optional keypoint verification of the top candidate pairs (OpenCV SIFT/ORB + RANSAC).

Global descriptors confuse images that share a layout; local keypoints that agree on one
homography do not. :func:`inliers` counts the RANSAC inliers of the ratio-test matches of two
images; :func:`verify_pairs` adds that count to the best ``top_k`` pairs of every query, so a
later step can re-rank or filter on it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

MIN_MATCHES = 4  # a homography needs four correspondences


@dataclass(frozen=True)
class Method:
    create: Callable[[], cv2.Feature2D]
    norm: int  # BFMatcher distance


METHODS: dict[str, Method] = {
    "sift": Method(lambda: cv2.SIFT_create(nfeatures=1000), cv2.NORM_L2),
    "orb": Method(lambda: cv2.ORB_create(nfeatures=1000), cv2.NORM_HAMMING),
}


@dataclass
class Keypoints:
    points: np.ndarray  # (n, 2) float32 pixel coordinates
    descriptors: np.ndarray | None  # (n, d); None when no keypoint was found
    size: tuple[int, int] = (0, 0)  # (width, height) of the grey image the points are in


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown keypoint method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def _gray(img: Image.Image | np.ndarray, max_side: int) -> np.ndarray:
    """8-bit grey image whose longer side is at most ``max_side``."""
    arr = np.asarray(img.convert("L") if isinstance(img, Image.Image) else img)
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    scale = max_side / max(arr.shape[:2])
    if scale < 1:
        arr = cv2.resize(arr, (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def describe(img: Image.Image | np.ndarray, method: str = "sift", max_side: int = 512) -> Keypoints:
    """Keypoints and descriptors of an RGB (PIL or HxWx3 uint8) or grey image."""
    gray = _gray(img, max_side)
    kps, desc = _method(method).create().detectAndCompute(gray, None)
    return Keypoints(np.array([k.pt for k in kps], np.float32).reshape(-1, 2), desc, (gray.shape[1], gray.shape[0]))


def matches(a: Keypoints, b: Keypoints, method: str = "sift", ratio: float = 0.75,
            reproj_px: float = 5.0) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC homography from ``a``'s points to ``b``'s, fit on the mutual ratio-test matches,
    and its inlier pairs as ``(n, 4)`` rows ``xa, ya, xb, yb`` (``(None, empty)`` when there
    are too few matches)."""
    none = (None, np.zeros((0, 4), np.float32))
    if a.descriptors is None or b.descriptors is None or len(a.points) < 2 or len(b.points) < 2:
        return none
    matcher = cv2.BFMatcher(_method(method).norm)
    knn = matcher.knnMatch(a.descriptors, b.descriptors, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    # keep mutual nearest neighbours only: many-to-one matches let RANSAC fit noise
    back = {m.queryIdx: m.trainIdx for m in matcher.match(b.descriptors, a.descriptors)}
    good = [m for m in good if back.get(m.trainIdx) == m.queryIdx]
    if len(good) < MIN_MATCHES:
        return none
    src = a.points[[m.queryIdx for m in good]]
    dst = b.points[[m.trainIdx for m in good]]
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, reproj_px)
    if mask is None:
        return none
    keep = mask.reshape(-1).astype(bool)
    return h, np.concatenate([src[keep], dst[keep]], axis=1).astype(np.float32)


def homography(a: Keypoints, b: Keypoints, method: str = "sift", ratio: float = 0.75,
               reproj_px: float = 5.0) -> tuple[np.ndarray | None, int]:
    """:func:`matches` as ``(homography, inlier count)``."""
    h, pairs = matches(a, b, method, ratio, reproj_px)
    return h, len(pairs)


def count_inliers(a: Keypoints, b: Keypoints, method: str = "sift", ratio: float = 0.75,
                  reproj_px: float = 5.0) -> int:
    """RANSAC-homography inliers among the mutual, ratio-test matches of two keypoint sets."""
    return homography(a, b, method, ratio, reproj_px)[1]


def inliers(img_a: Image.Image | np.ndarray, img_b: Image.Image | np.ndarray, method: str = "sift",
            max_side: int = 512) -> int:
    """Number of keypoint matches of two images consistent with one homography."""
    return count_inliers(describe(img_a, method, max_side), describe(img_b, method, max_side), method)


def verify_pairs(pairs: pa.Table, query_paths: Mapping[str, str], reference_paths: Mapping[str, str],
                 top_k: int, load: Callable[[str], Image.Image], method: str = "sift", max_side: int = 512,
                 cache_size: int = 256) -> pa.Table:
    """``pairs`` (query_id, reference_id, score) with an ``inliers`` int32 column.

    Only the ``top_k`` highest-scoring pairs of each query are verified; the others get a
    null count. Query and reference ids map to files through their own split's map (a query
    and a reference may share an id), read with ``load`` (the stage passes the pipeline's
    decoder); keypoints of the last ``cache_size`` images are kept.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    selected = _top_k_rows(pairs, top_k)
    sides = ((pairs.column("query_id").to_pylist(), query_paths, "query"),
             (pairs.column("reference_id").to_pylist(), reference_paths, "reference"))
    for ids, paths, split in sides:
        missing = sorted({ids[i] for i in selected} - set(paths))[:5]
        if missing:
            raise ValueError(f"verify_pairs: no {split} image path for id(s) {missing}")
    cache: OrderedDict[tuple[str, str], Keypoints] = OrderedDict()

    def keypoints(side: int, image_id: str) -> Keypoints:
        key = (sides[side][2], image_id)
        if key not in cache:
            cache[key] = describe(load(sides[side][1][image_id]), method, max_side)
            if len(cache) > cache_size:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    counts: list[int | None] = [None] * pairs.num_rows
    for i in selected:
        counts[i] = count_inliers(keypoints(0, sides[0][0][i]), keypoints(1, sides[1][0][i]), method)
    return pairs.append_column("inliers", pa.array(counts, pa.int32()))


def _top_k_rows(pairs: pa.Table, k: int) -> list[int]:
    """Row numbers of the ``k`` best-scoring rows of each query, grouped by query."""
    order = pc.sort_indices(pairs, [("query_id", "ascending"), ("score", "descending")]).to_numpy()
    q = np.asarray(pairs.column("query_id").to_pylist(), dtype=object)[order]
    new = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    rank = np.arange(len(q)) - np.flatnonzero(new)[np.cumsum(new) - 1] if len(q) else np.zeros(0, int)
    return order[rank < k].tolist()
