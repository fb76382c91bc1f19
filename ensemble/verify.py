"""Verification of the top candidate pairs: keypoint inliers (:mod:`ensemble.keypoints`) or
copydet's learned verifier.

A :class:`PairScorer` turns images into what it compares (keypoints, region tokens; a query may
have several views: :class:`KeypointScorer` matches the query's mirror image too and keeps the
better view) and scores a query against its candidates; :data:`SCORERS` names them (``sift``,
``rootsift``, ``orb``: RANSAC inlier counts; ``learned``: the verifier's P(copy),
:mod:`core.models.verifier`). :func:`verify_pairs` adds a scorer's columns to the best ``top_k``
pairs of every query, so a later step can re-rank or filter on them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from core.models.verifier import load_verifier
from ensemble.keypoints import (
    KEYPOINT_METHODS,
    MIN_SIDE,
    KeypointMethod,
    Keypoints,
    best_matches,
    describe,
    keypoint_method,
    mirror_view,
    shrink,
)


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
    the better view counts; with ``coarse_side`` both images shrunk to it (then enlarged as
    thumbnails are) are matched too and the better of the two counts. ``keypoints`` is the smaller
    image's keypoint count (as described, not shrunk): how many inliers a copy had room for."""

    method: str = "sift"
    max_side: int = 512
    mirror: bool = True
    min_side: int = MIN_SIDE
    coarse_side: int = 0
    columns: dict[str, pa.DataType] = field(default_factory=lambda: dict(KEYPOINT_COLUMNS))
    cache_size: int = 256

    def __post_init__(self) -> None:
        keypoint_method(self.method)

    def describe(self, img: Image.Image, mirrored: bool = False) -> Keypoints:
        kp = describe(img, self.method, self.max_side, mirrored, self.min_side)
        if self.coarse_side:
            kp.coarse = describe(shrink(img, self.coarse_side), self.method, self.max_side, mirrored, self.min_side)
        return kp

    def describe_query(self, img: Image.Image) -> list[Keypoints]:
        """The query's views: as it is, and its mirror image when ``mirror``."""
        plain = self.describe(img)
        if not self.mirror:
            return [plain]
        if keypoint_method(self.method).mirror is None:  # ORB: described anew
            return [plain, self.describe(img, mirrored=True)]
        return [plain, mirror_view(plain, self.method)]

    def check(self, query: Sequence[Keypoints], candidate: Keypoints) -> tuple[np.ndarray, tuple[int, int]]:
        """The inlier pairs of :func:`best_matches` (of the better level, with ``coarse_side``) in
        fractions of each image's width and height, and the row of ``columns``."""
        levels = [(query, candidate)]
        if candidate.coarse is not None and all(v.coarse is not None for v in query):
            levels.append(([v.coarse for v in query], candidate.coarse))
        found, (a, b) = max(((best_matches(views, c, self.method)[1], (views[0], c)) for views, c in levels),
                            key=lambda level: len(level[0]))
        return found / np.array([*a.size, *b.size], np.float32), \
            (len(found), min(len(query[0].points), len(candidate.points)))

    def compare(self, query: Sequence[Keypoints], candidates: Sequence[Keypoints]) -> list[tuple[int, int]]:
        return [self.check(query, c)[1] for c in candidates]

    def pack(self, described: Keypoints | list[Keypoints]) -> dict[str, np.ndarray]:
        """Points, uint8 codes and frame (width, height, mirrored) of each view and of its coarse
        view; a mirror view that is a permutation of the plain one (SIFT) is only flagged, and made
        again on unpacking."""
        views = described if isinstance(described, list) else [described]
        derived = len(views) == 2 and keypoint_method(self.method).mirror is not None
        out = {"query": np.array(isinstance(described, list)), "mirror": np.array(derived)}
        for i, kp in enumerate(views[:1] if derived else views):
            for tag, level in ((f"{i}", kp), (f"c{i}", kp.coarse)):
                if level is not None:
                    out |= _pack_level(level, tag)
        return out

    def unpack(self, arrays: Mapping[str, np.ndarray]) -> Keypoints | list[Keypoints]:
        spec, views = keypoint_method(self.method), []
        while f"points{len(views)}" in arrays:
            i = len(views)
            views.append(_unpack_level(arrays, f"{i}", spec))
            if f"pointsc{i}" in arrays:
                views[i].coarse = _unpack_level(arrays, f"c{i}", spec)
        if bool(arrays["mirror"]):
            views.append(mirror_view(views[0], self.method))
        return views if bool(arrays["query"]) else views[0]


def _pack_level(kp: Keypoints, tag: str) -> dict[str, np.ndarray]:
    out = {f"points{tag}": kp.points, f"frame{tag}": np.array([*kp.size, kp.mirrored], np.int32)}
    if kp.codes is not None:
        out[f"codes{tag}"] = kp.codes
    return out


def _unpack_level(arrays: Mapping[str, np.ndarray], tag: str, spec: KeypointMethod) -> Keypoints:
    codes = arrays.get(f"codes{tag}")
    w, h, mirrored = (int(v) for v in arrays[f"frame{tag}"])
    return Keypoints(arrays[f"points{tag}"], spec.decode(codes), (w, h), bool(mirrored), codes)


@dataclass
class LearnedScorer:
    """P(copy) from copydet's learned verifier ``model`` (a registered ``verifier`` card), run on ``device``."""

    model: str
    registry: str | None = None
    device: str = "cpu"
    columns: dict[str, pa.DataType] = field(default_factory=lambda: {"copy_prob": pa.float32()})
    cache_size: int = 2048  # region tokens are small (~30 kB an image)

    def __post_init__(self) -> None:
        self.verifier = load_verifier(self.model, self.registry, self.device)

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
    return lambda max_side=512, mirror=True, min_side=MIN_SIDE, coarse_side=0, **_: \
        KeypointScorer(method, max_side, mirror, min_side, coarse_side)


# scorer name -> factory(max_side, mirror, min_side, coarse_side, model, registry, device; other keywords ignored);
# config names select them: one keypoint scorer per keypoint method (CPU only), and the learned verifier
SCORERS: dict[str, Callable[..., PairScorer]] = {
    **{name: _keypoint_scorer(name) for name in KEYPOINT_METHODS},
    "learned": lambda model, registry=None, device="cpu", **_: LearnedScorer(model, registry, device),
}


def make_scorer(name: str, **settings: Any) -> PairScorer:
    """The scorer ``name`` built with ``settings`` (max_side, mirror, model, registry, device)."""
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
    reference may share an id), read with ``load`` (the benches pass the pipeline's decoder);
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

    @lru_cache(maxsize=scorer.cache_size)
    def described(side: int, image_id: str) -> Any:
        img = load(sides[side][1][image_id])
        return scorer.describe_query(img) if side == 0 else scorer.describe(img)

    return compare_pairs(pairs, top_k, scorer, described, selected)


def compare_pairs(pairs: pa.Table, top_k: int, scorer: PairScorer, described: Callable[[int, str], Any],
                  selected: list[int] | None = None) -> pa.Table:
    """:func:`verify_pairs` with the images' descriptions from ``described(side, image_id)``
    (side 0: a query, as ``describe_query`` gives it; 1: a candidate), e.g. from a store.
    ``selected``: the rows of :func:`_top_k_rows`, when the caller has them already."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    selected = _top_k_rows(pairs, top_k) if selected is None else selected
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
