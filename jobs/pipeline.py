"""The whole pipeline as one Ray job: every stage in order on the same run folder."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from core.metrics import Metrics
from core.models.sscd import ensure_sscd
from core.store import exists, read_table, read_text, write_text
from core.yamlconf import load_yaml
from jobs import environment
from jobs.completeness import require_candidates
from jobs.config import ConfigError, PipelineConfig, pinned_paths
from jobs.inputs import run_ground_truth
from jobs.layout import RunDir
from jobs.lock import locked
from jobs.preflight import preflight
from jobs.reuse import lend, lender
from jobs.runtime import init_ray, target_address
from jobs.stages.evaluate import evaluate_run_files, format_metrics
from jobs.stages.extract import run_extract
from jobs.stages.fuse import require_final, run_fuse
from jobs.stages.manifest import run_manifest
from jobs.stages.patch import run_patch
from jobs.stages.reduce import run_reduce
from jobs.stages.search import run_search
from jobs.stages.verify import run_verify
from jobs.threshold import threshold_of

log = logging.getLogger(__name__)

Stage = Callable[[PipelineConfig, RunDir], object]
STAGES: dict[str, Stage] = {
    "manifest": run_manifest, "patch": run_patch, "extract": run_extract, "reduce": run_reduce,
    "search": run_search, "fuse": run_fuse, "verify": run_verify,
}


def save_config(cfg: PipelineConfig, run: RunDir, stages: Sequence[str]) -> None:
    """Write ``RUN/config.yaml``. Its data section stays the one the manifest was made from when this
    command does not make the manifest: later stages read the run's images, not this config's
    folders (``report`` and ``index --from-run`` read the ground truth from it)."""
    raw = pinned_paths(cfg.model_dump(mode="json"))
    if "manifest" not in stages and exists(run.config):
        raw["data"] = (load_yaml(read_text(run.config)) or {}).get("data", raw["data"])
    write_text(run.config, yaml.safe_dump(raw, sort_keys=False))


def run_stages(cfg: PipelineConfig, stages: Sequence[str] = tuple(STAGES), address: str | None = None,
               reuse: str | None = None) -> dict:
    """Run ``stages`` in order (each skips the shards it already wrote); returns seconds per stage.

    The run folder is locked first, then everything that can be checked before the first stage
    is (:func:`jobs.preflight.preflight`); config.yaml is written only once that passed. With
    ``reuse`` (a run folder) the stages start from its reference and train shards (:mod:`jobs.reuse`)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    target = target_address(cfg.ray, address)  # refused before anything is written when nothing answers there
    if "extract" in stages and (target or "").startswith("ray://"):
        raise ConfigError("extract runs on Ray Data, which does not work through Ray Client (ray://): run it from a "
                          "machine of the cluster with the head's address (HOST:6379), or `copydet submit` it")
    run = RunDir(cfg.output)
    if reuse and "manifest" not in stages:
        raise ValueError("reuse lends shards to a run that makes its manifest")
    with locked(run):
        source = lender(reuse, run) if reuse else None
        if "extract" in stages:  # SSCD members download on first use (the wheel's licence forbids bundling)
            ensure_sscd([m.name for m in cfg.models], cfg.registry)
        preflight(cfg, stages)
        lent = lend(cfg, run, source) if source else 0
        save_config(cfg, run, stages)
        init_ray(cfg.ray, address)
        environment.record(run, stages, source.root if lent else None)
        timings = {}
        for name in stages:
            t0 = time.perf_counter()
            STAGES[name](cfg, run)
            timings[name] = round(time.perf_counter() - t0, 2)
            log.info(f"[{name}] done in {timings[name]:.1f} s")
    return timings


def evaluate_run(cfg: PipelineConfig) -> Metrics | None:
    """Score the run's predictions if the config names a ground truth (checked against the run's
    inputs), once every candidates file the predictions come from is there."""
    gt = cfg.data.ground_truth_path()
    if gt is None:
        log.info("evaluate: no ground_truth.csv configured; skipped")
        return None
    run = RunDir(cfg.output)
    t = threshold_of(cfg, run)
    with locked(run):
        require_candidates(cfg, run, "evaluate")
        require_final(cfg, run)
        pairs = run_ground_truth(gt, run)
        warn_undecoded(pairs, run)
        m = evaluate_run_files(run.predictions, pairs, run.metrics, run.pr_curve, label=cfg.name, threshold=t)
    log.info(f"evaluate: {format_metrics(m, t)}  ({run.metrics}, {run.pr_curve})")
    return m


def warn_undecoded(pairs: list[tuple[str, str]], run: RunDir) -> None:
    """Name the ground-truth pairs whose query or reference did not decode: they count as missed."""
    manifest = read_table(run.manifest, ["split", "image_id"])

    def decoded(split: str, ids: list[str]) -> np.ndarray:
        known = pc.filter(manifest.column("image_id"), pc.equal(manifest.column("split"), split))
        return pc.is_in(pa.array(ids, pa.string()), value_set=known).to_numpy(zero_copy_only=False)

    ok = decoded("query", [q for q, _ in pairs]) & decoded("reference", [r for _, r in pairs])
    lost = [pair for pair, found in zip(pairs, ok) if not found]
    if lost:
        log.warning(f"evaluate: {len(lost)} ground-truth pair(s) name an image that did not decode (listed in "
                    f"{run.errors}); they count as missed, e.g. {lost[:3]}")


def run_pipeline(cfg: PipelineConfig, address: str | None = None, reuse: str | None = None) -> Metrics | None:
    t0 = time.perf_counter()
    with locked(RunDir(cfg.output)):
        timings = run_stages(cfg, address=address, reuse=reuse)
        m = evaluate_run(cfg)
        timings["total"] = round(time.perf_counter() - t0, 2)
        write_text(RunDir(cfg.output).timings, json.dumps(timings, indent=2))
    log.info(f"pipeline finished in {timings['total']:.1f} s -> {cfg.output}")
    return m
