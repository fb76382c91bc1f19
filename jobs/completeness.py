"""The files each stage must find from the stage before it: one place for "is the upstream complete?".

Every stage writes one file per unit of work, so the files a finished stage leaves are known in
advance from its own recorded settings and its inputs: manifest and patch shards from the pinned
input list (``RUN/inputs.parquet``) and ``patches.shard_size``; feature files from the patch
shards and ``extract.chunk_patches``; derived (reduce) features and candidates one per feature
file. A stage reads its upstream only after :func:`require_complete` found every expected file,
so a lost shard stops the run, named, instead of dropping images from the results.
"""
from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache
from typing import Any

from core.contracts import chunk_file, plan_chunks, shard_file, shard_split
from core.settings import read_settings
from core.store import chunks, exists, join, read_table, version
from jobs.config import PipelineConfig
from jobs.inputs import images
from jobs.layout import RunDir, shard_names

SHOWN = 8
Chunk = tuple[str, int, int, int]  # (patch shard, chunk index, first row, end row) of a feature file


class IncompleteUpstream(RuntimeError):
    """A stage's input folder lacks files its settings imply; the message names them."""


def require_pinned(run: RunDir) -> dict[str, Any]:
    """The manifest's recorded settings, if the run folder has pinned inputs and a manifest: the
    cheap check (two small files) that every stage after the manifest starts from."""
    settings = read_settings(run.manifest)
    if not exists(run.inputs) or settings is None:
        raise IncompleteUpstream(f"{run.root}: no pinned inputs or manifest settings; run `copydet manifest` first")
    return settings


def manifest_shards(run: RunDir) -> list[str]:
    """Manifest shards (= patch shards) of the pinned inputs: ``patches.shard_size`` images each."""
    settings = require_pinned(run)
    per_split = images(read_table(run.inputs), settings.get("limit"))
    return [shard_file(split, i) for split, files in sorted(per_split.items())
            for i, _, _ in chunks(len(files), settings["shard_size"])]


def chunk_plan(run: RunDir, chunk_patches: int, stage: str) -> list[Chunk]:
    """``(patch shard, chunk index, first row, end row)`` of every feature chunk (``extract.chunk_patches``)."""
    shards = manifest_shards(run)
    require_complete(run.patches, shards, stage, "patch")
    paths = [join(run.patches, shard) for shard in shards]
    return [(shard, i, start, stop) for shard, path in zip(shards, paths)
            for i, (start, stop) in enumerate(shard_chunks(path, version(path), chunk_patches))]


@lru_cache(maxsize=1 << 16)
def shard_chunks(path: str, stamp: tuple[int, int], chunk_patches: int) -> tuple[tuple[int, int], ...]:
    """:func:`plan_chunks` of one patch shard. Every stage asks for the plan of every feature key,
    and a shard's image ids are millions of strings at DISC21 scale: each is read once per
    process, and again only if the shard is rewritten (``stamp``: its :func:`version`)."""
    ids = read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    return tuple(plan_chunks(ids, chunk_patches))


def feature_files(cfg: PipelineConfig, run: RunDir, key: str, stage: str) -> list[str]:
    """Feature files of ``key`` (a model key or a derived one, which has its first source's files)."""
    source = next((keys[0] for keys, out in cfg.reduce_groups() if out == key), key) if cfg.reduce.active else key
    chunk_patches = (read_settings(run.features(source)) or {}).get("chunk_patches", cfg.extract.chunk_patches)
    return [chunk_file(shard, i) for shard, i, _, _ in chunk_plan(run, chunk_patches, stage)]


def require_complete(folder: str, expected: list[str], stage: str, producer: str) -> None:
    """Raise naming the files of ``expected`` missing from ``folder`` (``producer`` makes them)."""
    if not expected:
        raise IncompleteUpstream(f"{stage}: nothing to read in {folder}: the run's inputs give it no files "
                                 "(a split without images?)")
    have = set(shard_names(folder))
    missing = [n for n in expected if n not in have]
    if missing:
        shown = ", ".join(missing[:SHOWN]) + (" ..." if len(missing) > SHOWN else "")
        raise IncompleteUpstream(f"{stage}: {folder} is incomplete: {len(missing)} of {len(expected)} expected "
                                 f"file(s) missing ({shown}); run `copydet {producer}` on this run folder to finish it")


def require_manifest(run: RunDir, stage: str) -> None:
    require_complete(run.manifest, manifest_shards(run), stage, "manifest")


def require_features(cfg: PipelineConfig, run: RunDir, key: str, stage: str,
                     splits: Collection[str] | None = None) -> list[str]:
    """Check ``features/<key>/`` (the files of ``splits`` only, when given) and return its expected files."""
    producer = "reduce" if cfg.reduce.active and key not in {k for _, _, k in cfg.model_keys()} else "extract"
    expected = [n for n in feature_files(cfg, run, key, stage) if splits is None or shard_split(n) in splits]
    require_complete(run.features(key), expected, stage, producer)
    return expected


def require_fused(run: RunDir, stage: str, decoys: bool = False) -> None:
    """The fused predictions (one file, written whole by fuse after its candidates were complete),
    and with ``decoys`` the fused decoys."""
    for path in (run.fused, run.fused_decoys) if decoys else (run.fused,):
        if not exists(path):
            raise IncompleteUpstream(f"{stage}: {path} is missing; run `copydet fuse` on this run folder first")


def require_candidates(cfg: PipelineConfig, run: RunDir, stage: str) -> None:
    """Every search key has one candidates file (and with ``fuse.threshold: auto`` one decoys
    file) per query feature file."""
    for key in cfg.search_keys():
        queries = [n for n in feature_files(cfg, run, key, stage) if shard_split(n) == "query"]
        require_complete(run.candidates(key), queries, stage, "search")
        if cfg.decoys():
            require_complete(run.decoys(key), queries, stage, "search")
