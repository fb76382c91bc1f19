"""Stage 4: features -> candidates/<model>@<scale>/<query shard>.parquet (sharded faiss kNN).

Reference (and, for score normalisation, train) features are split into shards of at most
``search.shard_size`` rows; each shard is a Ray actor that reads its own rows and builds its
own index (ensemble.sharded). The driver reads one query feature file at a time, searches
it against every shard in parallel, merges the top-k and writes that file's candidates
atomically, so a re-run skips the query shards already written.

``search.pairs`` says which (query patch, reference patch) pairs are scored: ``all`` of
them, or the D2LV rule ``max(max_j f(A_j, R), max_l f(Q, B_l))`` (``d2lv``): the whole
query against every reference patch, and every query patch against whole references only,
so a small query region never meets a small reference tile.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from core.contracts import WHOLE_PATCH
from core.knn import Hits
from core.settings import pin_settings
from core.store import embeddings_from_arrow, join, read_table, write_table
from ensemble.decoys import decoy_hits
from ensemble.normalize import normalize_scores
from ensemble.sharded import ShardedIndex, format_info, hits_table
from jobs.completeness import require_features
from jobs.config import PipelineConfig, SearchConfig
from jobs.layout import RunDir, shard_names

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # query files searched ahead while the previous one is merged and written


def open_split(run: RunDir, key: str, split: str, cfg: SearchConfig, k_max: int,
               whole_only: bool = False) -> ShardedIndex | None:
    """Shard actors over one split's feature files (None when the split has none). They load their
    rows in the background: every split opened before the first call loads at once."""
    files = [join(run.features(key), n) for n in shard_names(run.features(key), split)]
    if not files:
        return None
    return ShardedIndex(files, cfg.index_spec(), cfg.shard_size, k_max,
                        {"num_cpus": cfg.cpus_per_shard, "num_gpus": cfg.gpus_per_shard}, whole_only=whole_only)


def routes(patch_ids: np.ndarray, d2lv: bool) -> list[tuple[np.ndarray, bool]]:
    """``(query rows, whole references only)`` pairs covering every query row once: with the
    D2LV rule the whole query meets every reference patch and its other patches meet whole
    references only."""
    rows = np.arange(len(patch_ids))
    if not d2lv:
        return [(rows, False)]
    is_whole = patch_ids == WHOLE_PATCH
    return [(rows[is_whole], False), (rows[~is_whole], True)]


def assemble(n: int, k: int, parts: Iterable[tuple[np.ndarray, Hits]]) -> Hits:
    """Every query row's top-k from the hits of its route, in row order; rows with fewer hits
    are padded (-inf scores)."""
    scores, image_ids = np.full((n, k), -np.inf, np.float32), np.full((n, k), "", object)
    patch_ids = np.zeros((n, k), np.int32)
    for rows, (s, im, p) in parts:
        w = s.shape[1]
        scores[rows, :w], image_ids[rows, :w], patch_ids[rows, :w] = s, im, p
    return scores, image_ids, patch_ids


def with_bias(cands: pa.Table, feats: pa.Table, bias: np.ndarray, beta: float) -> pa.Table:
    """Candidates normalised by each query patch's train similarity ``bias`` (rows of ``feats``)."""
    table = pa.table({"image_id": feats.column("image_id"), "patch_id": feats.column("patch_id"),
                      "bias": pa.array(np.asarray(bias), pa.float32())})
    return normalize_scores(cands, table, beta)


@dataclass
class References:
    """The reference index every query patch searches, and for ``pairs: d2lv`` a second
    index of whole references for the query patches other than the whole query."""

    all: ShardedIndex
    whole: ShardedIndex | None = None

    def route(self, patch_ids: np.ndarray) -> list[tuple[np.ndarray, ShardedIndex]]:
        """``(query rows, index)`` pairs covering every row once."""
        return [(rows, self.whole if whole_only else self.all)
                for rows, whole_only in routes(patch_ids, self.whole is not None)]

    def close(self) -> None:
        for index in (self.all, self.whole):
            if index is not None:
                index.close()


def check_background(cfg: PipelineConfig, train_rows: int, where: str) -> None:
    """Refuse more normalisation neighbours than there are train descriptors (one per train patch):
    extract checks it from the patches, before its work; search again from the features."""
    n = cfg.search.normalize.neighbours
    if (cfg.search.normalize.enabled or cfg.decoys()) and 0 < train_rows < n:
        raise ValueError(f"{where}: search.normalize.neighbours={n} exceeds the {train_rows} train descriptors "
                         "(one per train patch); lower it or add train images")


def train_k(cfg: PipelineConfig) -> int:
    """Train hits per query patch: the normalisation neighbours, and with decoys enough hits for
    every fold's top k and its background."""
    n = cfg.search.normalize.neighbours if cfg.search.normalize.enabled else 1
    return 2 * cfg.search.k + n if cfg.decoys() else n


class QueryFile:
    """One query feature file in flight: its rows and the pending shard searches per batch."""

    def __init__(self, run: RunDir, key: str, name: str, refs: References, train: ShardedIndex | None,
                 cfg: SearchConfig, train_k: int) -> None:
        self.name, self.cfg, self.train_k = name, cfg, train_k
        self.feats = read_table(join(run.features(key), name))
        emb = embeddings_from_arrow(self.feats.column("embedding"))
        self.refs = []  # (query rows, index, pending search) per batch
        for rows, index in refs.route(self.feats.column("patch_id").to_numpy()):
            for i in range(0, len(rows), cfg.query_batch):
                batch = rows[i:i + cfg.query_batch]
                self.refs.append((batch, index, index.search_async(emb[batch], cfg.k)))
        batches = [emb[i:i + cfg.query_batch] for i in range(0, len(emb), cfg.query_batch)]
        self.train = [train.search_async(b, train_k) for b in batches] if train else None
        self._train_hits: Hits | None = None

    def train_hits(self, train: ShardedIndex) -> Hits:
        """Every row's top train hits (``train_k``), merged once."""
        if self._train_hits is None:
            parts = [train.merge(p, self.train_k) for p in self.train]
            self._train_hits = tuple(np.concatenate([p[i] for p in parts]) if parts else
                                     np.zeros((0, self.train_k)) for i in range(3))
        return self._train_hits

    def hits(self) -> Hits:
        """Every row's top-k, in row order; rows with fewer hits are padded (-inf scores)."""
        k = self.cfg.k
        return assemble(self.feats.num_rows, k, [(rows, index.merge(pending, k)) for rows, index, pending in self.refs])

    def candidates(self, train: ShardedIndex | None, key: str) -> pa.Table:
        cands = hits_table(self.feats, self.hits(), key)
        if train is not None and self.cfg.normalize.enabled:
            scores = self.train_hits(train)[0][:, :self.cfg.normalize.neighbours]
            cands = with_bias(cands, self.feats, scores.mean(axis=1, dtype=np.float64), self.cfg.normalize.beta)
        return cands

    def decoys(self, train: ShardedIndex, key: str, folds: int) -> pa.Table:
        """The train photos as references (``ensemble.decoys``): each query patch's top-k decoys,
        normalised against the train folds other than their own."""
        norm = self.cfg.normalize
        beta = norm.beta if norm.enabled else 0.0
        return hits_table(self.feats, decoy_hits(self.train_hits(train), folds, norm.neighbours, beta, self.cfg.k), key)


def search_settings(cfg: PipelineConfig) -> dict:
    """What the candidates depend on (not the resources they were computed with)."""
    return cfg.search.model_dump(exclude={"cpus_per_shard", "gpus_per_shard", "query_batch"})


def decoy_settings(cfg: PipelineConfig) -> dict:
    return {**search_settings(cfg), "folds": cfg.fuse.decoy_folds}


def search_key(cfg: PipelineConfig, run: RunDir, key: str) -> None:
    """Search every pending query file of one model key, with a progress bar of query files."""
    scfg = cfg.search
    require_features(cfg, run, key, "search")
    pin_settings(run.candidates(key), search_settings(cfg), "search")
    if cfg.decoys():
        pin_settings(run.decoys(key), decoy_settings(cfg), "search (decoys)")
    names = shard_names(run.features(key), "query")
    done = set(shard_names(run.candidates(key)))
    decoys_done = set(shard_names(run.decoys(key))) if cfg.decoys() else set(names)
    todo = [n for n in names if n not in done or n not in decoys_done]
    if not todo:
        return
    everything = open_split(run, key, "reference", scfg, scfg.k)
    if everything is None:
        raise RuntimeError(f"search {key}: no reference features in {run.features(key)}")
    whole = open_split(run, key, "reference", scfg, scfg.k, whole_only=True) if cfg.whole_reference_index() else None
    refs = References(everything, whole)
    k_train = train_k(cfg)
    train = open_split(run, key, "train", scfg, k_train) if scfg.normalize.enabled or cfg.decoys() else None
    try:
        if cfg.decoys() and train is None:
            raise ValueError(f"search {key}: fuse.threshold auto needs train/ images (the decoys); there are no "
                             f"train features in {run.features(key)}")
        for split, index in (("reference", everything), ("reference (whole images)", whole), ("train", train)):
            if index is not None:  # waits for its actors to load
                log.info(format_info(f"search {key} {split}", index.info()))
        if scfg.normalize.enabled and train is None:
            log.info(f"search {key}: normalisation is on but there are no train features; scores are raw")
        if train is not None:
            check_background(cfg, train.rows, f"search {key}")
        flight: deque[QueryFile] = deque()
        with tqdm(total=len(names), initial=len(names) - len(todo), desc=f"search {key}", unit="shard") as bar:
            for i, name in enumerate(todo):
                flight.append(QueryFile(run, key, name, refs, train, scfg, k_train))
                while flight and (len(flight) > IN_FLIGHT or i == len(todo) - 1):
                    q = flight.popleft()
                    if cfg.decoys() and q.name not in decoys_done:
                        write_table(q.decoys(train, key, cfg.fuse.decoy_folds), join(run.decoys(key), q.name))
                    if q.name not in done:
                        write_table(q.candidates(train, key), join(run.candidates(key), q.name))
                    bar.update()
        log.info(f"search {key}: {len(names)} query shard(s) searched ({len(todo)} in this run) -> "
                 f"{run.candidates(key)}")
    finally:
        refs.close()
        if train is not None:
            train.close()


def run_search(cfg: PipelineConfig, run: RunDir) -> None:
    if cfg.decoys() and cfg.patches.train != cfg.patches.reference:
        log.warning("search: fuse.threshold auto with patches.train unlike patches.reference: the decoys are "
                    "not cut as references are, so their scores (and the threshold) are off; give train/ the "
                    "reference views")
    for key in cfg.search_keys():
        search_key(cfg, run, key)
