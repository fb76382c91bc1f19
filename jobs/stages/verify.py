"""Stage 6 (optional): verification of each query's best candidates.

A method (:data:`VERIFY_METHODS`) names the scorers it needs (``ensemble.verify.SCORERS``: keypoint
inliers, the learned verifier's P(copy)) and the rule that turns their columns into a bonus on
the fused score. Each scorer's results are cached in ``verify.parquet/<scorer>/`` by
(query, reference) pair, its settings pinned there, so a re-run (or another method sharing a
scorer, e.g. ``learned+rootsift`` after ``rootsift``) only scores pairs it has not seen.
Queries are verified ``verify.window`` at a time. Each image of a window is described once
(``verify.parquet/<scorer>-described/``, :mod:`ensemble.described`), however many of the
window's queries have it among their candidates, and a query once for its references and its
decoys. That store is scratch: emptied after each window, so its size is bounded by the window,
not the dataset (a candidate of queries in two windows is described in both).
``predictions.csv`` is rewritten from ``fused.parquet`` every time, so running this stage
twice never boosts a score twice.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.contracts import shard_file
from core.imageio import load_rgb
from core.models.cards import RegistryError
from core.models.registry import registry_path, weights_hash
from core.models.resolve import resolve_model
from core.settings import pin_settings, settings_changes
from core.store import chunks, exists, folder_bytes, join, list_shards, num_rows, read_table, remove_dir, write_table
from ensemble.described import index_described, read_described, to_blob, write_described
from ensemble.fuse import top_k_per_query
from ensemble.keypoints import KEYPOINT_METHODS
from ensemble.verify import KEYPOINT_COLUMNS, PairScorer, compare_pairs, make_scorer
from jobs.completeness import require_fused, require_manifest
from jobs.config import PipelineConfig, VerifyConfig
from jobs.layout import RunDir, next_shard_number, paths_of
from jobs.runtime import require_gpus, run_tasks
from jobs.stages.fuse import finish
from patchers.extract import pick_device

log = logging.getLogger(__name__)

QUERIES_PER_TASK = 64
KEYS = ["query_id", "reference_id"]
Columns = dict[str, np.ndarray]  # scorer column -> values aligned with the fused rows (NaN: not scored)


def inlier_bonus(cols: Columns, cfg: VerifyConfig) -> np.ndarray:
    """``confirm`` at ``min_inliers`` inliers, rising linearly by ``weight`` more up to ``saturate``
    inliers. Below ``min_inliers`` the silence is evidence too, as strong as the texture a copy
    would have matched on: ``-penalty`` scaled by the smaller image's keypoints, full at
    ``penalty_keypoints``."""
    span = max(cfg.saturate - cfg.min_inliers, 1)
    inl = np.nan_to_num(cols["inliers"], nan=0.0)
    silent = cols["inliers"] < cfg.min_inliers  # NaN (not checked): False
    room = np.clip(np.nan_to_num(cols["keypoints"], nan=0.0) / cfg.penalty_keypoints, 0.0, 1.0)
    rise = cfg.weight * np.clip((inl - cfg.min_inliers) / span, 0.0, 1.0)
    confirmed = cols["inliers"] >= cfg.min_inliers  # NaN: False
    return rise + cfg.confirm * confirmed - cfg.penalty * silent * room


def learned_bonus(cols: Columns, cfg: VerifyConfig) -> np.ndarray:
    """0 up to P(copy) = ``learned.floor``, rising linearly to ``learned.weight`` at 1."""
    p = np.nan_to_num(cols["copy_prob"], nan=0.0)
    floor = cfg.learned.floor
    return cfg.learned.weight * np.clip((p - floor) / (1.0 - floor), 0.0, 1.0)


COMBINE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"max": np.maximum, "sum": np.add}


@dataclass(frozen=True)
class VerifyMethod:
    """A verification method: the scorers it runs and its bonus rule."""

    scorers: tuple[str, ...]
    bonus: Callable[[Columns, VerifyConfig], np.ndarray]


def both_bonus(cols: Columns, cfg: VerifyConfig) -> np.ndarray:
    """The keypoint and learned bonuses combined by ``verify.combine``."""
    return COMBINE[cfg.combine](inlier_bonus(cols, cfg), learned_bonus(cols, cfg))


VERIFY_METHODS: dict[str, VerifyMethod] = {
    **{name: VerifyMethod((name,), inlier_bonus) for name in KEYPOINT_METHODS},  # sift, rootsift, orb
    "learned": VerifyMethod(("learned",), learned_bonus),
    **{f"learned+{name}": VerifyMethod(("learned", name), both_bonus) for name in KEYPOINT_METHODS},
}


def keypoint_settings(name: str, cfg: PipelineConfig) -> dict:
    v = cfg.verify  # coarse_side only when on: caches made before it existed stay valid
    return {"scorer": name, "max_side": v.max_side, "min_side": v.min_side, "mirror": v.mirror,
            **({"coarse_side": v.coarse_side} if v.coarse_side else {}), "columns": list(KEYPOINT_COLUMNS)}


def learned_settings(name: str, cfg: PipelineConfig) -> dict:
    card = resolve_model(cfg.verify.learned.model, cfg.registry)  # by content, as a descriptor model
    if card.kind != "verifier":  # checked before the run starts (preflight), not inside its tasks
        raise RegistryError(f"model {card.name!r} is a {card.kind}, not a verifier")
    return {"scorer": name, "model": card.name, "weights_sha256": weights_hash(card)}


@dataclass(frozen=True)
class ScorerPlan:
    """How the stage runs a scorer: what its cached results depend on (pinned in its folder and
    passed to its tasks), how many queries a task takes (a task describes each image once) and
    the GPUs a task asks for (a model's scorer: the learned verifier)."""

    settings: Callable[[str, PipelineConfig], dict]
    queries_per_task: int
    num_gpus: Callable[[PipelineConfig], float] = lambda cfg: 0.0


SCORER_PLANS: dict[str, ScorerPlan] = {
    **{name: ScorerPlan(keypoint_settings, QUERIES_PER_TASK) for name in KEYPOINT_METHODS},
    # region tokens are ~30 kB an image (keypoints ~300 kB): bigger tasks share more references
    "learned": ScorerPlan(learned_settings, 4 * QUERIES_PER_TASK, lambda cfg: cfg.verify.learned.num_gpus),
}


def registry_dir(cfg: PipelineConfig) -> str:
    return str(registry_path(cfg.registry))


@dataclass(frozen=True)
class ScorerJob:
    """What a task builds its scorer from: the ``settings`` the stage pins (their ``scorer`` names
    it) and the registry; ``num_gpus`` above 0 is asked of Ray per task and puts the scorer's model
    on the GPU (not pinned: a pair scores alike on either)."""

    settings: dict
    registry: str
    num_gpus: float = 0.0

    def scorer(self) -> PairScorer:
        return make_scorer(self.settings["scorer"], registry=self.registry, device=pick_device(self.num_gpus > 0),
                           **self.settings)

    @property
    def options(self) -> dict:
        """The Ray task options."""
        return {"num_gpus": self.num_gpus} if self.num_gpus else {}


def scorer_jobs(cfg: PipelineConfig) -> dict[str, ScorerJob]:
    """Scorer folder name -> how its tasks build it, for the method's scorers (resolves a learned model)."""
    registry = registry_dir(cfg)
    return {name: ScorerJob(settings, registry, SCORER_PLANS[name].num_gpus(cfg))
            for name, settings in verify_settings(cfg).items()}


def scorer_for(name: str, cfg: PipelineConfig, use_gpu: bool = False) -> PairScorer:
    """Scorer ``name`` built from the settings the stage pins, as its tasks build it (the
    service uses this too, so both score a pair alike); ``use_gpu``: its model on the GPU."""
    return ScorerJob(SCORER_PLANS[name].settings(name, cfg), registry_dir(cfg), float(use_gpu)).scorer()


def describe_chunk(images: list[tuple[str, str]], split: str, job: ScorerJob, out: str) -> int:
    """Describe ``images`` (id, file) of ``split`` (queries with all their views) into one store shard.
    A task gets its own files only: the whole paths dict would be unpickled by every task."""
    scorer = job.scorer()
    describe = scorer.describe_query if split == "query" else scorer.describe
    return write_described(((i, to_blob(scorer.pack(describe(load_rgb(path))))) for i, path in images), out)


def verify_chunk(pairs: pa.Table, shards: tuple[dict[str, str], dict[str, str]], job: ScorerJob, top_k: int,
                 out: str) -> int:
    """Score ``pairs`` from the store (``shards``: query and candidate id -> store shard)."""
    scorer = job.scorer()
    packed = [read_described(side) for side in shards]  # compact (uint8 codes); unpacked as they are met

    @lru_cache(maxsize=scorer.cache_size)
    def described(side: int, image_id: str) -> Any:
        return scorer.unpack(packed[side][image_id])

    checked = compare_pairs(pairs, top_k, scorer, described)
    columns = list(scorer.columns)
    checked = checked.filter(pc.is_valid(checked.column(columns[0])))
    write_table(checked.select(KEYS + columns), out)
    return checked.num_rows


def store_folder(run: RunDir, name: str) -> str:
    return join(run.verify, f"{name}-described")


def describe_missing(name: str, job: ScorerJob, run: RunDir, split: str, ids: set[str], per_task: int,
                     label: str = "") -> dict[str, str]:
    """image id -> store shard for ``ids`` of ``split``, describing those the store lacks (their
    files looked up in ``run``'s manifest)."""
    store = store_folder(run, name)
    index = index_described(store, split)
    missing = sorted(ids - index.keys())
    files = paths_of(run, split, missing)
    todo = [(i, files[i]) for i in missing]
    start = next_shard_number(list_shards(store, f"{split}-"))
    calls = [(todo[a:b], split, job, join(store, shard_file(split, start + i)))
             for i, a, b in chunks(len(todo), per_task)]
    run_tasks(describe_chunk, calls, f"describe {name} {split}{label}", job.options)
    index.update({image_id: call[-1] for call in calls for image_id, _ in call[0]})
    return {i: index[i] for i in ids}


def rescore(fused: pa.Table, checked: dict[str, pa.Table], cfg: VerifyConfig) -> pa.Table:
    """``fused`` scores plus the method's bonus; ``checked``: each scorer's cached table."""
    joined = fused
    for table in checked.values():
        joined = joined.join(table, KEYS, join_type="left outer")
    cols = {c: np.asarray(joined.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
            for t in checked.values() for c in t.column_names if c not in KEYS}
    score = joined.column("score").to_numpy() + VERIFY_METHODS[cfg.method].bonus(cols, cfg)
    return pa.table({"query_id": joined.column("query_id"), "reference_id": joined.column("reference_id"),
                     "score": pa.array(score.astype(np.float32))})


def verify_settings(cfg: PipelineConfig) -> dict[str, dict]:
    """Scorer folder name -> the settings its cached results depend on (resolves a learned model)."""
    return {name: SCORER_PLANS[name].settings(name, cfg) for name in VERIFY_METHODS[cfg.verify.method].scorers}


def cache_folder(run: RunDir, name: str, decoys: bool = False) -> str:
    return join(run.verify, f"{name}-decoys" if decoys else name)


def read_cache(run: RunDir, name: str, decoys: bool = False) -> pa.Table:
    """Every pair scorer ``name`` has checked for ``run``'s predictions (``decoys``: its train decoys)."""
    shards = list_shards(cache_folder(run, name, decoys))
    if not shards:
        raise FileNotFoundError(f"{cache_folder(run, name, decoys)}: no pair scored by {name!r} yet; run `copydet "
                                f"verify` on {run.root} with a verify.method that uses it")
    return pa.concat_tables([read_table(s) for s in shards])


@dataclass(frozen=True)
class Pass:
    """The fused scores of the predictions or of the train decoys, and the pairs of them to check."""

    fused: pa.Table
    top_k: int
    decoys: bool = False

    @cached_property
    def todo(self) -> pa.Table:
        return top_k_per_query(self.fused, self.top_k)


def decoy_depth(cfg: VerifyConfig) -> int:
    """Train decoys verified per query: never deeper than the predictions, or decoys would be
    penalised where non-copies are not."""
    return min(cfg.decoy_top_k, cfg.top_k)


@dataclass(frozen=True)
class ByQuery:
    """Pairs sorted by query id, with the ids as an array: a range of queries is two binary
    searches and a zero-copy slice, not a scan of the table."""

    table: pa.Table
    ids: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> ByQuery:
        table = table.sort_by("query_id")
        return cls(table, table.column("query_id").to_numpy(zero_copy_only=False))

    def between(self, first: str, last: str) -> ByQuery:
        a, b = np.searchsorted(self.ids, first, "left"), np.searchsorted(self.ids, last, "right")
        return ByQuery(self.table.slice(a, b - a), self.ids[a:b])

    def queries(self) -> list[str]:
        return list(dict.fromkeys(self.ids))  # sorted already


@dataclass(frozen=True)
class Unscored:
    """The pairs of a pass that a scorer has not cached, and the numbers its next shards take."""

    pairs: ByQuery
    shard_numbers: Iterator[int]


def unscored(run: RunDir, name: str, settings: dict, p: Pass) -> Unscored:
    """What scorer ``name`` has left of ``p``. The cache folder is read once per run here, not
    once per window: a window's pairs are a slice of these, its shards numbered on from these."""
    folder = cache_folder(run, name, p.decoys)
    pin_settings(folder, settings, f"verify ({name})")  # a cache of other settings is refused before it is read
    shards = list_shards(folder)
    todo = p.todo
    if shards:
        done = pa.concat_tables([read_table(s, KEYS) for s in shards])
        todo = todo.join(done, KEYS, join_type="left anti")
    return Unscored(ByQuery.of(todo), itertools.count(next_shard_number(shards)))


def score_pairs(name: str, job: ScorerJob, run: RunDir, todo: ByQuery, top_k: int, decoys: bool = False,
                label: str = "", shard_numbers: Iterator[int] | None = None) -> int:
    """Cache scorer ``name``'s columns (built by ``job``, :func:`scorer_jobs`) for the pairs of
    ``todo``, none of them cached yet (:func:`unscored`), with Ray tasks (``decoys``: pairs of
    queries and train photos, cached apart in ``<scorer>-decoys``); returns how many pairs that was.
    The shards take ``shard_numbers`` (by default, on from those in the folder)."""
    pairs = todo.table
    if not pairs.num_rows:
        return 0
    folder = cache_folder(run, name, decoys)
    plan = SCORER_PLANS[name]
    pin_settings(folder, job.settings, f"verify ({name})")
    queries = todo.queries()
    store = store_folder(run, name)
    if settings_changes(store, job.settings):  # scratch left by a run with other settings
        remove_dir(store)
    pin_settings(store, job.settings, f"verify ({name}) descriptions")
    where = [describe_missing(name, job, run, split, set(pairs.column(col).to_pylist()), plan.queries_per_task,
                              label)
             for split, col in (("query", "query_id"), ("train" if decoys else "reference", "reference_id"))]
    numbers = shard_numbers or itertools.count(next_shard_number(list_shards(folder)))
    calls = []
    for _, a, b in chunks(len(queries), plan.queries_per_task):
        part = todo.between(queries[a], queries[b - 1]).table
        shards = tuple({k: index[k] for k in part.column(col).to_pylist()}
                       for index, col in zip(where, ("query_id", "reference_id")))
        calls.append((part, shards, job, top_k, join(folder, f"part-{next(numbers):05d}.parquet")))
    run_tasks(verify_chunk, calls, f"verify {name}{' decoys' if decoys else ''}{label}", job.options)
    return pairs.num_rows


def check_passes(cfg: PipelineConfig, run: RunDir, passes: list[Pass]) -> None:
    """Score the pairs of ``passes`` that the method's scorers have not cached, ``verify.window``
    queries at a time: each image of a window is described once into the scratch store (a query
    serves its references and its decoys), and the store is emptied before the next window. Windows
    are cut from the queries with pairs left to score, so a resumed run starts where it stopped
    (and keeps the scratch of the window it stopped in)."""
    jobs = scorer_jobs(cfg)  # once: a learned model's weights are hashed
    require_gpus(max(job.num_gpus for job in jobs.values()), "verify.learned.num_gpus")
    todo = {name: [unscored(run, name, job.settings, p) for p in passes] for name, job in jobs.items()}
    queries = sorted(set().union(*(t.pairs.queries() for ts in todo.values() for t in ts)))
    windows = list(chunks(len(queries), cfg.verify.window))
    for n, a, b in windows:
        label = f" ({n + 1}/{len(windows)})" if len(windows) > 1 else ""
        for name, job in jobs.items():
            scored = sum(score_pairs(name, job, run, left.pairs.between(queries[a], queries[b - 1]), p.top_k,
                                     p.decoys, label, left.shard_numbers)
                         for p, left in zip(passes, todo[name]))
            if not scored:
                continue
            store = store_folder(run, name)
            described = sum(num_rows(s) for s in list_shards(store))
            log.info(f"verify ({name}){label}: {described} images described, "
                     f"{folder_bytes(store) / 1e6:.0f} MB of scratch emptied")
            remove_dir(store)  # every pair of the window is cached by now
    for name in jobs:  # scratch a stopped run left after its last pair
        remove_dir(store_folder(run, name))


def rescored(cfg: PipelineConfig, run: RunDir, p: Pass) -> pa.Table:
    """The fused scores of ``p`` plus the method's bonus, from the scorers' caches (its pairs only:
    a cache may hold pairs of an earlier, larger top_k or another fusion, which get no bonus now)."""
    wanted = p.todo.select(KEYS)
    checked = {name: read_cache(run, name, p.decoys).join(wanted, KEYS, join_type="left semi")
               for name in VERIFY_METHODS[cfg.verify.method].scorers}
    counts = ", ".join(f"{name} {t.num_rows}" for name, t in checked.items())
    log.info(f"verify ({cfg.verify.method}){' decoys' if p.decoys else ''}: pairs scored: {counts}")
    return rescore(p.fused, checked, cfg.verify)


def run_verify(cfg: PipelineConfig, run: RunDir) -> None:
    if not cfg.verify.enabled:
        log.info("verify: off (set verify.enabled=true to verify candidates)")
        fused = exists(run.fused) and (not cfg.decoys() or exists(run.fused_decoys))
        if exists(run.verify) and fused:  # verified before: the predictions go back to the fused ones
            decoys = read_table(run.fused_decoys) if cfg.decoys() else None
            finish(read_table(run.fused), decoys, cfg, run, "fused")
            log.info(f"verify: off; {run.predictions} holds the fused scores again")
        return
    require_manifest(run, "verify")
    require_fused(run, "verify", cfg.decoys())
    passes = [Pass(read_table(run.fused), cfg.verify.top_k)]
    if cfg.decoys():  # the decoys are verified as the predictions are, so the threshold holds on final scores
        passes.append(Pass(read_table(run.fused_decoys), decoy_depth(cfg.verify), decoys=True))
    check_passes(cfg, run, passes)
    verified, *decoys = (rescored(cfg, run, p) for p in passes)
    finish(verified, decoys[0] if decoys else None, cfg, run, "verified")
    log.info(f"verify ({cfg.verify.method}) -> {run.predictions}")
