"""Decoded query images -> the batch pipeline's answer, against one loaded index version.

Each step is the pipeline's own: the query side's views and the members' encoders
(:class:`patchers.embed.ImageEmbedder`), ``reduce`` (:func:`jobs.stages.reduce.derive`), the
search stage's routing, padding and per-view normalisation (:mod:`jobs.stages.search`) over the
index's shards, max over patch pairs and the fusion rule (:mod:`ensemble.fuse`), then keypoint
verification and its re-scoring (:mod:`ensemble.verify`, :func:`jobs.stages.verify.rescore`).
So a served top-k equals ``copydet run``'s predictions for the same config and references.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from core.imageio import load_rgb
from core.store import embeddings_from_arrow
from ensemble.fuse import fuse, max_over_patches, top_k_per_query
from ensemble.index.reader import IndexVersion, KeyIndex
from ensemble.sharded import hits_table
from ensemble.verify import Keypoints, describe, matches
from jobs.config import PipelineConfig
from jobs.indexing import derive_keys, embedder_for, index_config
from jobs.stages.search import assemble, routes, with_bias
from jobs.stages.verify import rescore
from patchers.embed import ImageEmbedder

REFERENCE_KEYPOINTS_CACHE = 256


def key_candidates(feats: pa.Table, key: str, index: KeyIndex, cfg: PipelineConfig) -> pa.Table:
    """One search key's candidates for query patch features, as the search stage writes them."""
    emb = embeddings_from_arrow(feats.column("embedding"))
    k = cfg.search.k
    parts = [(rows, index.search(emb[rows], k, whole_only))
             for rows, whole_only in routes(feats.column("patch_id").to_numpy(), cfg.whole_reference_index())]
    cands = hits_table(feats, assemble(len(emb), k, parts), key)
    if cfg.search.normalize.enabled and index.train is not None:
        cands = with_bias(cands, feats, index.bias(emb, cfg.search.normalize.neighbours), cfg.search.normalize.beta)
    return cands


def same_answers(a: PipelineConfig, b: PipelineConfig) -> bool:
    """Whether two configs embed and score alike (they differ at most in serve, index and ray)."""
    skip = {"serve", "index", "ray"}
    return a.model_dump(exclude=skip) == b.model_dump(exclude=skip)


class Matcher:
    """The models, views and one index version; :meth:`match` answers a batch of images."""

    def __init__(self, root: str, version: str | None = None, overrides: Sequence[str] = (),
                 reuse: Matcher | None = None) -> None:
        self.version, self.cfg = index_config(root, version, overrides)
        s = self.cfg.search
        self.index = IndexVersion(root, self.version, s.index_spec(), s.normalize.neighbours)
        if reuse is not None and reuse.index.meta["cards"] == self.index.meta["cards"] \
                and same_answers(reuse.cfg, self.cfg):
            self.embedder: ImageEmbedder = reuse.embedder  # same models and views: keep them loaded
        else:
            self.embedder = embedder_for(root, self.version, self.cfg, "query", self.cfg.serve.num_threads)
        v = self.cfg.verify
        self.reference_keypoints = lru_cache(REFERENCE_KEYPOINTS_CACHE)(
            lambda image_id: describe(load_rgb(self.index.paths[image_id]), v.method, v.max_side))

    def match(self, images: Sequence[Image.Image]) -> list[dict]:
        """One answer per image: ``matches`` (best first), ``is_copy``, ``threshold``, ``timings``."""
        timings: dict[str, float] = {}
        named = [(f"q{i}", img) for i, img in enumerate(images)]
        tables = self.embedder.embed(named, timings)
        t0 = time.perf_counter()
        train = {key: self.index.keys[key].train_x for key in self.cfg.search_keys()} if self.cfg.reduce.stretch else {}
        feats = derive_keys(self.cfg, tables, self.index.pca, train)
        per_model = pa.concat_tables([max_over_patches(key_candidates(f, key, self.index.keys[key], self.cfg))
                                      for key, f in feats.items()])
        fused = top_k_per_query(fuse(per_model, self.cfg.fuse.thresholds, self.cfg.fuse.rule), self.cfg.fuse.k)
        t1 = time.perf_counter()
        checked = self.verify(fused, dict(named)) if self.cfg.verify.enabled else {}
        if checked:
            table = pa.Table.from_pylist([{"query_id": q, "reference_id": r, "inliers": len(p)}
                                          for (q, r), p in checked.items()])
            fused = rescore(fused, table, self.cfg.verify)
        timings.update(search=t1 - t0, verify=time.perf_counter() - t1)
        return [self.answer(fused, query_id, checked, timings, len(images)) for query_id, _ in named]

    def verify(self, fused: pa.Table, images: dict[str, Image.Image]) -> dict[tuple[str, str], np.ndarray]:
        """Inlier point pairs (fractions ``xq, yq, xr, yr``) of each query's ``verify.top_k`` best pairs."""
        v = self.cfg.verify
        out = {}
        todo = top_k_per_query(fused, v.top_k)
        queries: dict[str, Keypoints] = {}
        for q, r in zip(todo.column("query_id").to_pylist(), todo.column("reference_id").to_pylist()):
            if q not in queries:
                queries[q] = describe(images[q], v.method, v.max_side)
            a, b = queries[q], self.reference_keypoints(r)
            _, pairs = matches(a, b, v.method)
            out[(q, r)] = pairs / np.array([*a.size, *b.size], np.float32) if len(pairs) else pairs
        return out

    def answer(self, fused: pa.Table, query_id: str, checked: dict, timings: dict, batch: int) -> dict:
        rows = fused.filter(pc.equal(fused.column("query_id"), query_id)).to_pylist()
        rows.sort(key=lambda r: -r["score"])
        matches_ = []
        for r in rows:
            pairs = checked.get((query_id, r["reference_id"]))
            inliers = None if pairs is None else len(pairs)
            matches_.append({"reference_id": r["reference_id"], "score": float(r["score"]),
                             "verified": None if inliers is None else inliers >= self.cfg.verify.min_inliers,
                             "inliers": inliers,
                             "keypoints": [] if pairs is None else np.round(pairs, 4).tolist()})
        threshold = self.cfg.copy_threshold()
        return {"matches": matches_, "is_copy": bool(matches_ and matches_[0]["score"] >= threshold),
                "threshold": threshold, "version": self.version, "batch_size": batch,
                "timings": {k: round(v, 4) for k, v in timings.items()}}
