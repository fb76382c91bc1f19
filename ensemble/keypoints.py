"""Local features of an image and whether two images agree: SIFT / RootSIFT / ORB keypoints
(OpenCV), mutual ratio-test matches and the inliers of one RANSAC homography.

Global descriptors confuse images that share a layout; local evidence that agrees does not.
:func:`inliers` counts the RANSAC inliers of the ratio-test matches of two images. Keypoint
descriptors are not mirror-invariant, so a flipped copy matches only its original's mirror image:
:func:`mirror_view` gives the features of the mirror image for SIFT (a permutation of the plain
ones; ORB describes the flipped image). :data:`KEYPOINT_METHODS` names the keypoint methods.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

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
class KeypointMethod:
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


KEYPOINT_METHODS: dict[str, KeypointMethod] = {
    "sift": KeypointMethod(_sift, l2_matches, SIFT_MIRROR),
    "rootsift": KeypointMethod(_sift, l2_matches, SIFT_MIRROR, root_sift),
    "orb": KeypointMethod(lambda: cv2.ORB_create(nfeatures=1000), hamming_matches, dtype=np.uint8),
}


@dataclass
class Keypoints:
    points: np.ndarray  # (n, 2) float32 pixel coordinates
    descriptors: np.ndarray | None  # (n, d); None when no keypoint was found
    size: tuple[int, int] = (0, 0)  # (width, height) of the grey image the points are in
    mirrored: bool = False  # points and descriptors are of the image flipped left to right
    codes: np.ndarray | None = None  # the detector's descriptors as uint8: ``descriptors`` in a quarter of the bytes
    coarse: Keypoints | None = None  # of the image shrunk (:func:`shrink`), when the scorer matches that too


def keypoint_method(name: str) -> KeypointMethod:
    if name not in KEYPOINT_METHODS:
        raise ValueError(f"unknown keypoint method {name!r}; known: {sorted(KEYPOINT_METHODS)}")
    return KEYPOINT_METHODS[name]


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


def shrink(img: Image.Image | np.ndarray, side: int) -> np.ndarray:
    """The grey image shrunk (area) to longer side ``side``, if longer: blur, pixelation and
    downscaling leave a copy's coarse structure, which this keeps and finer detail does not."""
    return _gray(img, side, 0)


def describe(img: Image.Image | np.ndarray, method: str = "sift", max_side: int = 512,
             mirrored: bool = False, min_side: int = MIN_SIDE) -> Keypoints:
    """Keypoints and descriptors of an RGB (PIL or HxWx3 uint8) or grey image (of its mirror
    image when ``mirrored``)."""
    gray = _gray(img, max_side, min_side)
    if mirrored:
        gray = np.ascontiguousarray(gray[:, ::-1])
    spec = keypoint_method(method)
    kps, desc = spec.create().detectAndCompute(gray, None)
    codes = None if desc is None else desc.astype(np.uint8)
    return Keypoints(np.array([k.pt for k in kps], np.float32).reshape(-1, 2), spec.decode(codes),
                     (gray.shape[1], gray.shape[0]), mirrored, codes)


def mirror_view(plain: Keypoints, method: str = "sift") -> Keypoints:
    """The features of the mirror image, from ``plain``'s where the method's descriptor layout
    allows (SIFT: the same numbers as describing the flipped image, at no cost; its coarse level
    too). A method without that permutation (ORB) describes the flipped image instead
    (``describe(..., mirrored=True)``)."""
    permutation = keypoint_method(method).mirror
    if permutation is None:
        raise ValueError(f"{method}: no mirror permutation; describe the image with mirrored=True")
    points = plain.points.copy()
    points[:, 0] = plain.size[0] - 1 - points[:, 0]
    desc, codes = (None if a is None else np.ascontiguousarray(a[:, permutation])
                   for a in (plain.descriptors, plain.codes))
    coarse = None if plain.coarse is None else mirror_view(plain.coarse, method)
    return Keypoints(points, desc, plain.size, True, codes, coarse)


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
    ia, ib = keypoint_method(method).match(a.descriptors, b.descriptors, ratio)
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
