"""Stage 2: manifest.parquet/ -> patches.parquet/ (one patch shard per manifest shard).

A side whose views need pixels (region proposals, detector boxes) decodes its images in the
shard task; other sides only need the image ids. A shard file that exists is done, so a
re-run resumes. At the end the patches per image of every split are reported.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.compute as pc

from core.contracts import shard_split
from core.models.cards import RegistryError
from core.models.registry import load_card, weights_hash
from core.settings import pin_settings
from core.store import join, read_table, write_table
from jobs.completeness import require_manifest
from jobs.config import PipelineConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import run_tasks
from patchers.plan import DetectorSpec, needs_pixels, plan_images, plan_table
from patchers.proposals import ProposalParams
from patchers.views import ViewConfig

log = logging.getLogger(__name__)


def resolve_detector(name: str | None, registry: str | None) -> DetectorSpec | None:
    """The local ONNX file of registered detector ``name`` (None: no detector). A pickled
    checkpoint (``.pt``) is refused unopened: unpickling can run any code it names."""
    if name is None:
        return None
    card = load_card(name, registry)
    if card.kind != "detector" or not card.weights or not Path(card.weights).is_file():
        raise RegistryError(f"model {name!r} is not a detector with local weights "
                            f"(kind {card.kind}, weights {card.weights})")
    if Path(card.weights).suffix.lower() != ".onnx":
        raise RegistryError(f"detector {name!r}: {card.weights} is not an ONNX file; copydet never loads a pickled "
                            "checkpoint (loading one can run any code in it). Run `copydet detector train CONFIG` "
                            "again: it exports the trained detector to ONNX and registers that")
    from patchers.detector.predict import check_detector  # onnxruntime only where a detector is used
    weights = str(Path(card.weights).resolve())
    check_detector(weights, card.name)
    return DetectorSpec(weights, card.input_size, weights_hash(card))


def patch_shard(run: RunDir, name: str, views: ViewConfig, detector: DetectorSpec | None = None,
                max_pixels: int | None = None) -> int:
    """Plan one manifest shard; returns the number of images that failed to decode."""
    if needs_pixels(views):
        manifest = read_table(join(run.manifest, name), columns=["image_id", "path"])
        pairs = list(zip(manifest.column("image_id").to_pylist(), manifest.column("path").to_pylist()))
        table, failed = plan_images(pairs, views, detector, ProposalParams(conf=views.detector_conf),
                                    max_pixels=max_pixels)
    else:
        ids = read_table(join(run.manifest, name), columns=["image_id"]).column("image_id").to_pylist()
        table, failed = plan_table(ids, views), []
    write_table(table, join(run.patches, name))
    return len(failed)


def patch_counts(run: RunDir) -> dict[str, tuple[int, float, int]]:
    """split -> (images, mean patches per image, max patches per image), over all shards."""
    per_split: dict[str, list[int]] = {}
    for name in shard_names(run.patches):
        ids = read_table(join(run.patches, name), columns=["image_id"]).column("image_id")
        counts = pc.value_counts(ids).field("counts").to_pylist()
        per_split.setdefault(shard_split(name), []).extend(counts)
    return {s: (len(c), sum(c) / len(c), max(c)) for s, c in per_split.items() if c}


def side_views(cfg: PipelineConfig) -> dict[str, ViewConfig]:
    return {"query": cfg.patches.query, "reference": cfg.patches.reference, "train": cfg.patches.train}


def patch_settings(cfg: PipelineConfig, detectors: dict[str, DetectorSpec | None]) -> dict:
    """What the patch shards depend on: each side's views (and its detector's weights, by content)."""
    settings = {s: v.model_dump() for s, v in side_views(cfg).items()}
    return {**settings, **{f"{s}_detector_sha256": d.sha256 for s, d in detectors.items() if d is not None}}


def resolve_detectors(cfg: PipelineConfig) -> dict[str, DetectorSpec | None]:
    return {s: resolve_detector(v.detector, cfg.registry) for s, v in side_views(cfg).items()}


def run_patch(cfg: PipelineConfig, run: RunDir) -> None:
    require_manifest(run, "patch")
    sides, detectors = side_views(cfg), resolve_detectors(cfg)
    pin_settings(run.patches, patch_settings(cfg, detectors), "patch")
    done = set(shard_names(run.patches))
    calls = []
    for n in shard_names(run.manifest):
        split = shard_split(n)
        if n not in done:
            calls.append((run, n, sides[split], detectors[split], cfg.data.max_pixels))
    failed = sum(run_tasks(patch_shard, calls, "patch"))
    if failed:
        log.info(f"patch: {failed} image(s) no longer decode; they kept only their geometric views")
    for split, (images, mean, most) in sorted(patch_counts(run).items()):
        log.info(f"patch: {split}: {images} images, {mean:.1f} patches/image (max {most})")
