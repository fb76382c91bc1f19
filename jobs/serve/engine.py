"""Decoded query images -> the batch pipeline's answer, against one loaded index version.

Each step is the pipeline's own: the query side's views and the members' encoders
(:class:`patchers.embed.ImageEmbedder`), ``reduce`` (:func:`jobs.stages.reduce.derive`), the
search stage's routing, padding and per-view normalisation (:mod:`jobs.stages.search`) over the
index's shards, max over patch pairs and the fusion rule (:mod:`ensemble.fuse`), then keypoint
verification by the configured method's scorers and its re-scoring (:mod:`ensemble.verify`,
:func:`jobs.stages.verify.rescore`).
So a served top-k equals ``copydet run``'s predictions for the same config and references.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from core.imageio import ImageDecodeError, load_rgb
from core.metrics import written
from core.store import embeddings_from_arrow
from ensemble.decoys import q_at
from ensemble.fuse import demote_others, fuse, max_over_patches, top_k_per_query
from ensemble.index.reader import IndexVersion, KeyIndex
from ensemble.sharded import hits_table
from ensemble.verify import KeypointScorer
from jobs.config import PipelineConfig
from jobs.indexing import derive_keys, embedder_for, index_config
from jobs.stages.search import assemble, routes, with_bias
from jobs.stages.verify import VERIFY_METHODS, rescore, scorer_for
from patchers.embed import ImageEmbedder

log = logging.getLogger(__name__)

REFERENCE_CACHE = 256  # described references kept per scorer


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
        self.index = IndexVersion(root, self.version, s.index_spec(), s.normalize.neighbours,
                                  reuse.index if reuse is not None else None)
        if reuse is not None and reuse.index.meta["cards"] == self.index.meta["cards"] \
                and same_answers(reuse.cfg, self.cfg):
            self.embedder: ImageEmbedder = reuse.embedder  # same models and views: keep them loaded
        else:
            self.embedder = embedder_for(root, self.version, self.cfg, "query", self.cfg.serve.num_threads,
                                         use_gpu=self.cfg.serve.num_gpus > 0)
        self.scorers = {name: scorer_for(name, self.cfg, use_gpu=self.cfg.serve.num_gpus > 0)
                        for name in VERIFY_METHODS[self.cfg.verify.method].scorers}
        paths = self.index.paths  # not self: a cache that held its Matcher would keep a swapped-out version alive
        self.references = {name: lru_cache(REFERENCE_CACHE)(lambda image_id, sc=sc: sc.describe(
            load_rgb(paths[image_id]))) for name, sc in self.scorers.items()}

    def match(self, images: Sequence[Image.Image], sources: Sequence[str | bytes] | None = None) -> list[dict]:
        """One answer per image: ``matches`` (best first), ``is_copy``, ``threshold``, ``timings``;
        ``sources`` (the images' files or bytes) let big JPEGs decode as the batch pipeline does."""
        timings: dict[str, float] = {}
        named = [(f"q{i}", img) for i, img in enumerate(images)]
        by_name = {name: src for (name, _), src in zip(named, sources)} if sources else None
        tables = self.embedder.embed(named, timings, by_name)
        t0 = time.perf_counter()
        train = {key: self.index.keys[key].train_x for key in self.cfg.search_keys()} if self.cfg.reduce.stretch else {}
        feats = derive_keys(self.cfg, tables, self.index.pca, train)
        per_model = pa.concat_tables([max_over_patches(key_candidates(f, key, self.index.keys[key], self.cfg))
                                      for key, f in feats.items()])
        f = self.cfg.fuse
        fused = top_k_per_query(fuse(per_model, f.thresholds, f.rule, f.calibration), f.k)
        t1 = time.perf_counter()
        checked: dict[tuple[str, str], dict] = {}
        if self.cfg.verify.enabled and fused.num_rows:  # an index with no live reference has no pair to check
            checked = self.verify(fused, dict(named))
            tables = {name: pa.Table.from_pylist([{"query_id": q, "reference_id": r, **found[name]}
                                                  for (q, r), found in checked.items()])
                      for name in self.scorers}
            fused = rescore(fused, tables, self.cfg.verify)
        fused = demote_others(fused, f.demote_others)
        timings.update(search=t1 - t0, verify=time.perf_counter() - t1)
        return [self.answer(fused, query_id, checked, timings, len(images)) for query_id, _ in named]

    def verify(self, fused: pa.Table, images: dict[str, Image.Image]) -> dict[tuple[str, str], dict]:
        """Each scorer's columns (a dict) for each query's ``verify.top_k`` best pairs; keypoint
        scorers also give their inlier point pairs (fractions ``xq, yq, xr, yr``) under ``"pairs"``."""
        todo = top_k_per_query(fused, self.cfg.verify.top_k)
        pairs = list(zip(todo.column("query_id").to_pylist(), todo.column("reference_id").to_pylist()))
        out: dict[tuple[str, str], dict] = {pair: {} for pair in pairs}
        for name, scorer in self.scorers.items():
            queries: dict[str, object] = {}
            for q, r in pairs:
                if q not in queries:
                    queries[q] = scorer.describe_query(images[q])
                try:
                    b = self.references[name](r)
                except ImageDecodeError as e:  # e.g. the ingest folder was cleaned after `index add`
                    log.warning("serve: %s; its pairs are left unverified", e)
                    out[(q, r)][name] = dict.fromkeys(scorer.columns, math.nan)
                    continue
                a = queries[q]
                if isinstance(scorer, KeypointScorer):
                    found, row = scorer.check(a, b)
                    out[(q, r)]["pairs"] = found
                else:
                    row = scorer.compare(a, [b])[0]
                out[(q, r)][name] = dict(zip(scorer.columns, row))
        return out

    def answer(self, fused: pa.Table, query_id: str, checked: dict, timings: dict, batch: int) -> dict:
        rows = fused.filter(pc.equal(fused.column("query_id"), query_id)).to_pylist()
        rows.sort(key=lambda r: -r["score"])
        matches_ = []
        for r in rows:
            found = checked.get((query_id, r["reference_id"]), {})
            pairs = found.get("pairs")
            inliers = None if pairs is None else len(pairs)
            prob = next((found[n]["copy_prob"] for n in self.scorers if n in found and "copy_prob" in found[n]), None)
            score = written(r["score"])  # as in the CSVs
            matches_.append({"reference_id": r["reference_id"], "score": score, "q_value": self.q_value(score),
                             "verified": self.verified(inliers, prob), "inliers": inliers, "copy_prob": prob,
                             "keypoints": [] if pairs is None else np.round(pairs, 4).tolist()})
        threshold = written(self.cfg.copy_threshold())  # compared as copies.csv's float32 scores are
        return {"matches": matches_, "is_copy": bool(matches_ and matches_[0]["score"] >= threshold),
                "threshold": threshold, "version": self.version, "batch_size": batch,
                "timings": {k: round(v, 4) for k, v in timings.items()}}

    def q_value(self, score: float) -> float | None:
        """The score's q-value on the curve of the run the index was built from (None without one)."""
        curve = self.index.q_curve
        return None if not curve else q_at(curve, score)

    def verified(self, inliers: int | None, prob: float | None) -> bool | None:
        """Whether a checked pair passed verification: enough inliers, or P(copy) above the floor
        of the learned rule (either, for a method with both); None when it was not checked."""
        v = self.cfg.verify
        votes = [x for x in (None if inliers is None else inliers >= v.min_inliers,
                             None if prob is None else prob > v.learned.floor) if x is not None]
        return any(votes) if votes else None
