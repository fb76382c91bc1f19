"""Verification of the top candidate pairs: keypoints (OpenCV SIFT/ORB + RANSAC) or copydet's
learned verifier.

Global descriptors confuse images that share a layout; local evidence that agrees does not.
:func:`inliers` counts the RANSAC inliers of the ratio-test matches of two images. Keypoint
descriptors are not mirror-invariant, so a flipped copy matches only its original's mirror image:
:class:`KeypointScorer` also matches the query's mirror (``mirror``) and keeps the better view. A
:class:`PairScorer` turns images into what it compares (keypoints, region tokens; a query may have
several views) and scores a query against its candidates; :data:`SCORERS` names them (``sift``,
``rootsift``, ``orb``: RANSAC inlier counts; ``learned``: the verifier's P(copy),
:mod:`core.models.verifier`). :func:`verify_pairs` adds a scorer's columns to the best ``top_k``
pairs of every query, so a later step can re-rank or filter on them.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from core.models.verifier import load_verifier

MIN_MATCHES = 4  # a homography needs four correspondences


Matcher = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def l2_matches(a: np.ndarray, b: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(ia, ib)`` of the mutual nearest neighbours of two float descriptor sets that
    pass the ratio test, from one distance matrix (a third of the time of OpenCV's two brute-force
    passes, which it reproduces)."""
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    d_two = np.take_along_axis(d2, two, axis=1)
    first = d_two.argmin(axis=1)
    best = two[np.arange(len(a)), first]
    d_best, d_second = d_two.min(axis=1), d_two.max(axis=1)
    ia = np.flatnonzero((d_best < ratio**2 * d_second) & (d2.argmin(axis=0)[best] == np.arange(len(a))))
    return ia, best[ia]


def hamming_matches(a: np.ndarray, b: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`l2_matches` for binary descriptors (ORB), with OpenCV's brute-force matcher."""
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [m[0] for m in matcher.knnMatch(a, b, k=2) if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    back = {m.queryIdx: m.trainIdx for m in matcher.match(b, a)}
    good = [m for m in good if back.get(m.trainIdx) == m.queryIdx]
    return np.array([m.queryIdx for m in good], np.int64), np.array([m.trainIdx for m in good], np.int64)


# A SIFT descriptor is 4 x 4 cells x 8 orientation bins in the keypoint's frame; mirroring the
# image mirrors that frame: cell rows reverse and orientation bin k becomes -k (mod 8).
SIFT_MIRROR = np.arange(128).reshape(4, 4, 8)[::-1, :, -np.arange(8) % 8].ravel()


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman, 2012): the square root of the L1-normalised
    descriptor, so that L2 distance compares histograms by the Hellinger kernel and a few large
    bins no longer dominate. Elementwise, so :data:`SIFT_MIRROR` still mirrors it."""
    desc = desc.astype(np.float32)
    return np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))


MIN_SIDE = 256  # thumbnails are enlarged to this longer side before detection (config: verify.min_side)


@dataclass(frozen=True)
class Method:
    create: Callable[[], cv2.Feature2D]
    match: Matcher  # mutual ratio-test matches
    mirror: np.ndarray | None = None  # descriptor permutation of the mirror image (None: describe it anew)
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied to the detector's descriptors
    dtype: type = np.float32  # of the detector's descriptors (whole numbers 0..255 for SIFT and ORB)

    def decode(self, codes: np.ndarray | None) -> np.ndarray | None:
        """The descriptors matched on, from the detector's as uint8 ``codes``."""
        if codes is None:
            return None
        desc = codes.astype(self.dtype)
        return desc if self.transform is None else self.transform(desc)


def _sift() -> cv2.Feature2D:
    return cv2.SIFT_create(nfeatures=1000)


METHODS: dict[str, Method] = {
    "sift": Method(_sift, l2_matches, SIFT_MIRROR),
    "rootsift": Method(_sift, l2_matches, SIFT_MIRROR, root_sift),
    "orb": Method(lambda: cv2.ORB_create(nfeatures=1000), hamming_matches, dtype=np.uint8),
}


@dataclass
class Keypoints:
    points: np.ndarray  # (n, 2) float32 pixel coordinates
    descriptors: np.ndarray | None  # (n, d); None when no keypoint was found
    size: tuple[int, int] = (0, 0)  # (width, height) of the grey image the points are in
    mirrored: bool = False  # points and descriptors are of the image flipped left to right
    codes: np.ndarray | None = None  # the detector's descriptors as uint8: ``descriptors`` in a quarter of the bytes


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown keypoint method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def _gray(img: Image.Image | np.ndarray, max_side: int, min_side: int) -> np.ndarray:
    """8-bit grey image whose longer side is at most ``max_side`` and, enlarged (cubic) when
    shorter, at least ``min_side`` (up to ``max_side``): a thumbnail has too few keypoints."""
    arr = np.asarray(img.convert("L") if isinstance(img, Image.Image) else img)
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    longer = max(arr.shape[:2])
    scale = min(max(longer, min_side), max_side) / longer
    if scale != 1:
        arr = cv2.resize(arr, (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def describe(img: Image.Image | np.ndarray, method: str = "sift", max_side: int = 512,
             mirrored: bool = False, min_side: int = MIN_SIDE) -> Keypoints:
    """Keypoints and descriptors of an RGB (PIL or HxWx3 uint8) or grey image (of its mirror
    image when ``mirrored``)."""
    gray = _gray(img, max_side, min_side)
    if mirrored:
        gray = np.ascontiguousarray(gray[:, ::-1])
    spec = _method(method)
    kps, desc = spec.create().detectAndCompute(gray, None)
    codes = None if desc is None else desc.astype(np.uint8)
    return Keypoints(np.array([k.pt for k in kps], np.float32).reshape(-1, 2), spec.decode(codes),
                     (gray.shape[1], gray.shape[0]), mirrored, codes)


def mirror_view(plain: Keypoints, img: Image.Image | np.ndarray, method: str = "sift",
                max_side: int = 512, min_side: int = MIN_SIDE) -> Keypoints:
    """The features of ``img``'s mirror image: ``plain``'s, mirrored, where the method's
    descriptor layout allows (SIFT: the same numbers as describing the flipped image, at no
    cost), else described anew."""
    permutation = _method(method).mirror
    if permutation is None:
        return describe(img, method, max_side, mirrored=True, min_side=min_side)
    points = plain.points.copy()
    points[:, 0] = plain.size[0] - 1 - points[:, 0]
    desc, codes = (None if a is None else np.ascontiguousarray(a[:, permutation])
                   for a in (plain.descriptors, plain.codes))
    return Keypoints(points, desc, plain.size, True, codes)


def matches(a: Keypoints, b: Keypoints, method: str = "sift", ratio: float = 0.75,
            reproj_px: float = 5.0) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC homography from ``a``'s points to ``b``'s, fit on the mutual ratio-test matches,
    and its inlier pairs as ``(n, 4)`` rows ``xa, ya, xb, yb`` (``(None, empty)`` when there
    are too few matches). The homography maps ``a`` as described (mirrored, if it is); the
    pairs are in the unmirrored image.

    Mutual nearest neighbours only: many-to-one matches let RANSAC fit noise.
    """
    none = (None, np.zeros((0, 4), np.float32))
    if a.descriptors is None or b.descriptors is None or len(a.points) < 2 or len(b.points) < 2:
        return none
    ia, ib = _method(method).match(a.descriptors, b.descriptors, ratio)
    if len(ia) < MIN_MATCHES:
        return none
    src, dst = a.points[ia], b.points[ib]
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, reproj_px)
    if mask is None:
        return none
    keep = mask.reshape(-1).astype(bool)
    src = src[keep].copy()
    if a.mirrored:
        src[:, 0] = a.size[0] - 1 - src[:, 0]
    return h, np.concatenate([src, dst[keep]], axis=1).astype(np.float32)


def best_matches(views: Sequence[Keypoints], b: Keypoints,
                 method: str = "sift") -> tuple[np.ndarray | None, np.ndarray]:
    """:func:`matches` of the query view (as described, or mirrored) with the most inliers."""
    return max((matches(v, b, method) for v in views), key=lambda found: len(found[1]))


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


class PairScorer(Protocol):
    """What a verification method computes per image and per (query, candidates) group."""

    columns: dict[str, pa.DataType]  # the columns verify_pairs adds; the first is the verdict
    cache_size: int  # described images kept (LRU)

    def describe(self, img: Image.Image) -> Any: ...

    def describe_query(self, img: Image.Image) -> Any: ...

    def compare(self, query: Any, candidates: Sequence[Any]) -> Sequence[tuple]:
        """One row of ``columns`` values per candidate."""

    def pack(self, described: Any) -> dict[str, np.ndarray]:
        """What ``describe``/``describe_query`` returned, as arrays (kept between tasks)."""

    def unpack(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The inverse of ``pack``: compares exactly as the image described anew."""


KEYPOINT_COLUMNS = {"inliers": pa.int32(), "keypoints": pa.int32()}


@dataclass
class KeypointScorer:
    """RANSAC inliers of SIFT / ORB keypoints (``method``), images shrunk to ``max_side`` and
    thumbnails enlarged to ``min_side``; with ``mirror`` the query's mirror image is matched too and
    the better view counts. ``keypoints`` is the smaller image's keypoint count: how many inliers a
    copy had room for."""

    method: str = "sift"
    max_side: int = 512
    mirror: bool = True
    min_side: int = MIN_SIDE
    columns: dict[str, pa.DataType] = field(default_factory=lambda: dict(KEYPOINT_COLUMNS))
    cache_size: int = 256

    def __post_init__(self) -> None:
        _method(self.method)

    def describe(self, img: Image.Image) -> Keypoints:
        return describe(img, self.method, self.max_side, min_side=self.min_side)

    def describe_query(self, img: Image.Image) -> list[Keypoints]:
        """The query's views: as it is, and its mirror image when ``mirror``."""
        plain = self.describe(img)
        if not self.mirror:
            return [plain]
        return [plain, mirror_view(plain, img, self.method, self.max_side, self.min_side)]

    def check(self, query: Sequence[Keypoints], candidate: Keypoints) -> tuple[np.ndarray, tuple[int, int]]:
        """The inlier pairs of :func:`best_matches` and the row of ``columns``."""
        found = best_matches(query, candidate, self.method)[1]
        return found, (len(found), min(len(query[0].points), len(candidate.points)))

    def compare(self, query: Sequence[Keypoints], candidates: Sequence[Keypoints]) -> list[tuple[int, int]]:
        return [self.check(query, c)[1] for c in candidates]

    def pack(self, described: Keypoints | list[Keypoints]) -> dict[str, np.ndarray]:
        """Points, uint8 codes and frame (width, height, mirrored) of each view."""
        views = described if isinstance(described, list) else [described]
        out = {"query": np.array(isinstance(described, list))}
        for i, kp in enumerate(views):
            out[f"points{i}"] = kp.points
            if kp.codes is not None:
                out[f"codes{i}"] = kp.codes
            out[f"frame{i}"] = np.array([*kp.size, kp.mirrored], np.int32)
        return out

    def unpack(self, arrays: Mapping[str, np.ndarray]) -> Keypoints | list[Keypoints]:
        spec, views = _method(self.method), []
        while f"points{len(views)}" in arrays:
            i = len(views)
            codes = arrays.get(f"codes{i}")
            w, h, mirrored = (int(v) for v in arrays[f"frame{i}"])
            views.append(Keypoints(arrays[f"points{i}"], spec.decode(codes), (w, h), bool(mirrored), codes))
        return views if bool(arrays["query"]) else views[0]


@dataclass
class LearnedScorer:
    """P(copy) from copydet's learned verifier ``model`` (a registered ``verifier`` card)."""

    model: str
    registry: str | None = None
    columns: dict[str, pa.DataType] = field(default_factory=lambda: {"copy_prob": pa.float32()})
    cache_size: int = 2048  # region tokens are small (~30 kB an image)

    def __post_init__(self) -> None:
        self.verifier = load_verifier(self.model, self.registry)

    def describe(self, img: Image.Image) -> np.ndarray:
        return self.verifier.describe(img)

    describe_query = describe

    def compare(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[tuple[float]]:
        return [(float(p),) for p in self.verifier.score(query, candidates)]

    def pack(self, described: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": described}

    def unpack(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return arrays["tokens"]


def _keypoint_scorer(method: str) -> Callable[..., PairScorer]:
    return lambda max_side=512, mirror=True, min_side=MIN_SIDE, **_: KeypointScorer(method, max_side, mirror, min_side)


# scorer name -> factory(max_side, mirror, min_side, model, registry; other keywords ignored); config
# names select them: one keypoint scorer per keypoint method, and the learned verifier
SCORERS: dict[str, Callable[..., PairScorer]] = {
    **{name: _keypoint_scorer(name) for name in METHODS},
    "learned": lambda model, registry=None, **_: LearnedScorer(model, registry),
}


def make_scorer(name: str, **settings: Any) -> PairScorer:
    """The scorer ``name`` built with ``settings`` (max_side, mirror, model, registry)."""
    if name not in SCORERS:
        raise ValueError(f"unknown verification scorer {name!r}; known: {sorted(SCORERS)}")
    return SCORERS[name](**settings)


def verify_pairs(pairs: pa.Table, query_paths: Mapping[str, str], reference_paths: Mapping[str, str],
                 top_k: int, load: Callable[[str], Image.Image], method: str = "sift", max_side: int = 512,
                 scorer: PairScorer | None = None, mirror: bool = True) -> pa.Table:
    """``pairs`` (query_id, reference_id, score) with the scorer's columns (``inliers`` and
    ``keypoints`` of the keypoint ``method`` by default), images described as they are met.

    Only the ``top_k`` highest-scoring pairs of each query are verified; the others get a
    null. Query and reference ids map to files through their own split's map (a query and a
    reference may share an id), read with ``load`` (the stage passes the pipeline's decoder);
    what the scorer describes of the last ``scorer.cache_size`` images is kept.
    """
    scorer = scorer or KeypointScorer(method, max_side, mirror)
    selected = _top_k_rows(pairs, top_k)
    sides = ((pairs.column("query_id").to_pylist(), query_paths, "query"),
             (pairs.column("reference_id").to_pylist(), reference_paths, "reference"))
    for ids, paths, split in sides:
        missing = sorted({ids[i] for i in selected} - set(paths))[:5]
        if missing:
            raise ValueError(f"verify_pairs: no {split} image path for id(s) {missing}")
    cache: OrderedDict[tuple[int, str], Any] = OrderedDict()

    def described(side: int, image_id: str) -> Any:
        key = (side, image_id)
        if key not in cache:
            img = load(sides[side][1][image_id])
            cache[key] = scorer.describe_query(img) if side == 0 else scorer.describe(img)
            if len(cache) > scorer.cache_size:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    return compare_pairs(pairs, top_k, scorer, described)


def compare_pairs(pairs: pa.Table, top_k: int, scorer: PairScorer,
                  described: Callable[[int, str], Any]) -> pa.Table:
    """:func:`verify_pairs` with the images' descriptions from ``described(side, image_id)``
    (side 0: a query, as ``describe_query`` gives it; 1: a candidate), e.g. from a store."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    selected = _top_k_rows(pairs, top_k)
    queries, candidates = pairs.column("query_id").to_pylist(), pairs.column("reference_id").to_pylist()
    values: list[tuple | None] = [None] * pairs.num_rows
    for start in range(len(selected)):  # rows come grouped by query: compare each group at once
        if start and queries[selected[start]] == queries[selected[start - 1]]:
            continue
        rows = [i for i in selected[start:start + top_k] if queries[i] == queries[selected[start]]]
        query = described(0, queries[rows[0]])
        found = scorer.compare(query, [described(1, candidates[i]) for i in rows])
        for i, row in zip(rows, found):
            values[i] = row
    for j, (name, dtype) in enumerate(scorer.columns.items()):
        pairs = pairs.append_column(name, pa.array([None if v is None else v[j] for v in values], dtype))
    return pairs


def _top_k_rows(pairs: pa.Table, k: int) -> list[int]:
    """Row numbers of the ``k`` best-scoring rows of each query, grouped by query."""
    order = pc.sort_indices(pairs, [("query_id", "ascending"), ("score", "descending")]).to_numpy()
    q = np.asarray(pairs.column("query_id").to_pylist(), dtype=object)[order]
    new = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    rank = np.arange(len(q)) - np.flatnonzero(new)[np.cumsum(new) - 1] if len(q) else np.zeros(0, int)
    return order[rank < k].tolist()
