"""Stage 1: image folders -> manifest.parquet/ (+ errors.parquet/ for files that fail)."""
from __future__ import annotations

import logging
import os

import pyarrow as pa

from core.contracts import ERRORS_SCHEMA, MANIFEST_SCHEMA
from core.imageio import list_images
from core.store import chunks, join, write_table
from jobs.config import PipelineConfig
from jobs.layout import RunDir, pin_settings, shard_file, shard_names
from jobs.runtime import run_tasks
from patchers.manifest import describe

log = logging.getLogger(__name__)


def manifest_shard(split: str, files: list[tuple[str, str]], run: RunDir, name: str) -> tuple[int, int]:
    """Decode one block of files; errors are written before the manifest shard, whose
    existence marks the block done."""
    rows, errors = [], []
    for image_id, path in files:
        row, err = describe(image_id, path, split)
        (rows if row else errors).append(row or err)
    write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), join(run.errors, name))
    write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), join(run.manifest, name))
    return len(rows), len(errors)


def run_manifest(cfg: PipelineConfig, run: RunDir) -> None:
    folders = cfg.data.folders()
    local = {s: os.path.abspath(f) for s, f in folders.items()}  # image folders are local (list_images)
    pin_settings(run.manifest, {"folders": local, "limit": cfg.data.limit, "shard_size": cfg.patches.shard_size},
                 "manifest")
    done = set(shard_names(run.manifest))
    calls = []
    for split, folder in folders.items():
        files = list_images(folder, cfg.data.limit)
        if not files:
            log.warning(f"manifest: warning: no images in {folder}")
        for i, a, b in chunks(len(files), cfg.patches.shard_size):
            if shard_file(split, i) not in done:
                calls.append((split, files[a:b], run, shard_file(split, i)))
    results = run_tasks(manifest_shard, calls, "manifest")
    bad = sum(e for _, e in results)
    if bad:
        log.info(f"manifest: {bad} file(s) failed to decode, listed in {run.errors}")
