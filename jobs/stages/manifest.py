"""Stage 1: image folders -> manifest.parquet/ (+ errors.parquet/ for files that fail).

The files come from the pinned input list (``jobs.inputs``): files that are not images (another
extension, a broken symlink, an unreadable folder) go to ``errors.parquet/listing.parquet``;
every image is decoded in a shard task and lands in the manifest or in errors.parquet.
"""
from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from core.contracts import ERRORS_SCHEMA, MANIFEST_SCHEMA, shard_file
from core.settings import pin_settings
from core.store import chunks, exists, join, read_table, write_table
from jobs.config import SPLIT_FOLDERS, PipelineConfig
from jobs.inputs import InputError, images, pin_inputs, split_folders
from jobs.layout import RunDir, shard_names
from jobs.runtime import run_tasks
from patchers.manifest import manifest_row

log = logging.getLogger(__name__)

LISTING = "listing.parquet"  # errors.parquet/ file of the paths under the folders that are not images


def manifest_shard(split: str, files: list[tuple[str, str]], run: RunDir, name: str,
                   max_pixels: int | None = None) -> tuple[int, int]:
    """Decode one block of files; errors are written before the manifest shard, whose
    existence marks the block done."""
    rows, errors = [], []
    for image_id, path in files:
        row, err = manifest_row(image_id, path, split, max_pixels)
        (rows if row else errors).append(row or err)
    write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), join(run.errors, name))
    write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), join(run.manifest, name))
    return len(rows), len(errors)


def manifest_settings(cfg: PipelineConfig) -> dict:
    """What the manifest shards depend on (image folders are local: ``scan_images``)."""
    return {"folders": {s: os.path.abspath(f) for s, f in cfg.data.folders().items()}, "limit": cfg.data.limit,
            "shard_size": cfg.patches.shard_size, "max_pixels": cfg.data.max_pixels}


def run_manifest(cfg: PipelineConfig, run: RunDir) -> None:
    pin_settings(run.manifest, manifest_settings(cfg), "manifest")
    inputs = read_table(run.inputs) if exists(run.inputs) else pin_inputs(run, split_folders(cfg.data))
    rejected = inputs.filter(pc.is_valid(inputs.column("error"))).select(ERRORS_SCHEMA.names)
    if not exists(join(run.errors, LISTING)):
        write_table(rejected.cast(ERRORS_SCHEMA), join(run.errors, LISTING))
    if rejected.num_rows:
        log.warning(f"manifest: {rejected.num_rows} file(s) under the image folders are not images; "
                    f"listed in {run.errors}, e.g. {rejected.column('error')[0]}")
    done = set(shard_names(run.manifest))
    calls = []
    for split, files in images(inputs, cfg.data.limit).items():
        for i, a, b in chunks(len(files), cfg.patches.shard_size):
            if shard_file(split, i) not in done:
                calls.append((split, files[a:b], run, shard_file(split, i), cfg.data.max_pixels))
    results = run_tasks(manifest_shard, calls, "manifest")
    bad = sum(e for _, e in results)
    if bad:
        log.info(f"manifest: {bad} file(s) failed to decode, listed in {run.errors}")
    require_decoded(run, {split: len(files) for split, files in images(inputs, cfg.data.limit).items()})


def require_decoded(run: RunDir, listed: dict[str, int]) -> None:
    """Refuse a split of which no image decodes: every later stage would run for nothing, and
    the first to notice (fuse) could not say why."""
    counts = pc.value_counts(read_table(run.manifest, ["split"]).column("split")).to_pylist()
    decoded = {c["values"]: c["counts"] for c in counts}
    for split, n in listed.items():
        if not decoded.get(split):
            raise InputError(f"manifest: none of the {n} {SPLIT_FOLDERS[split]} image(s) decodes; "
                             f"each is listed with its reason in {run.errors}")
