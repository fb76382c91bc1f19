"""``copydet tune``: pick beta, fusion thresholds and rule on a validation split, never the evaluation set.

1. A validation split: user-given queries + ground truth against the config's references (and
   train/), or a synthetic one cut from the config's *training* photos with an augmentation
   recipe (:func:`pretrain.synthetic.make_synthetic_split`).
2. The pipeline's own stages (manifest .. search, raw scores) run on it under ``RUN_DIR/tune/run``.
3. From its candidates, :mod:`ensemble.tune` picks beta and, with >= 2 members, the per-member
   thresholds and the rule (:func:`tune_members`); :func:`write_tuned_config` writes the input
   YAML with those values set, which ``copydet run`` then uses unchanged.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import pyarrow as pa
import yaml

from core.metrics import evaluate_table, read_ground_truth, read_predictions
from core.store import atomic_output, embeddings_from_arrow, join, read_table, write_table
from ensemble.calibrate import background_scale
from ensemble.fuse import demote_others
from ensemble.normalize import bias_table
from ensemble.tune import (
    GT,
    HELD_OUT_FOLDS,
    Member,
    Ranking,
    Setting,
    TuneResult,
    final_predictions,
    normalisable,
    threshold_at_precision,
    tune_members,
)
from jobs.config import PipelineConfig, apply_overrides, pinned_paths, read_yaml, set_key, validate
from jobs.layout import RunDir, shard_names
from jobs.pipeline import run_stages
from jobs.stages.verify import run_verify
from pretrain.synthetic import Split

log = logging.getLogger(__name__)

TUNE_STAGES = ("manifest", "patch", "extract", "search")


# ---------------------------------------------------------------- validation split

def user_split(cfg: PipelineConfig, queries: str, ground_truth: str) -> Split:
    """User-given validation queries + ground truth against the config's references and train/."""
    for p in (queries, ground_truth):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: no such validation file or folder")
    folders = cfg.data.folders()
    if "reference" not in folders:
        raise ValueError("tune: the config names no references folder to validate against")
    evaluation = cfg.data.ground_truth_path()
    same = [p for p, q in ((queries, folders.get("query")), (ground_truth, evaluation))
            if q and os.path.realpath(p) == os.path.realpath(q)]
    if same:
        raise ValueError(f"tune: {same[0]} is the config's evaluation data; tune on a separate validation set")
    if evaluation:
        pairs = set(read_ground_truth(ground_truth))
        shared = pairs & set(read_ground_truth(evaluation))
        if pairs and len(shared) * 2 >= len(pairs):
            raise ValueError(f"tune: {len(shared)} of the {len(pairs)} pairs of {ground_truth} are pairs of the "
                             f"config's evaluation ground truth {evaluation}; tune on a separate validation set")
    return Split(queries, ground_truth, folders["reference"], folders.get("train"),
                           f"user-given: queries {queries}, ground truth {ground_truth}", cfg.data.limit)


def validation_config(cfg: PipelineConfig, split: Split, output: str) -> PipelineConfig:
    """``cfg`` pointed at the split, writing to ``output``, with raw scores (beta is tuned later)."""
    raw = cfg.model_dump(mode="json")
    raw["data"] = {"root": None, "train": split.train, "references": split.references, "queries": split.queries,
                   "ground_truth": split.ground_truth, "limit": split.limit}
    raw["output"] = output
    raw["search"]["normalize"]["enabled"] = False
    raw["verify"]["enabled"] = False
    raw["fuse"]["threshold"] = None  # calibrated on the split's ground truth instead of decoys
    return validate(raw, "tune validation config")


# ---------------------------------------------------------------- tuning

def background_needed(neighbours: int) -> int:
    """Train descriptors a member needs to be normalised: its neighbours, and two for the tail scale."""
    return max(neighbours, 2)


def load_member(run: RunDir, key: str, neighbours: int) -> Member:
    """Candidates of ``key``, the bias of every query patch against the run's train features, and
    the tail scale of those background similarities (``ensemble.calibrate``)."""
    folder = run.features(key)
    cands = read_table(run.candidates(key))
    train = [read_table(join(folder, n), ["embedding"]) for n in shard_names(folder, "train")]
    rows = sum(t.num_rows for t in train)
    if rows < background_needed(neighbours):
        log.info(f"tune: {key}: {rows} train descriptor(s), fewer than the {background_needed(neighbours)} "
                 f"normalisation needs (search.normalize.neighbours={neighbours}; 2 at least); beta not tuned")
        return Member(key, cands, None)
    queries = pa.concat_tables(read_table(join(folder, n), ["image_id", "patch_id", "embedding"])
                               for n in shard_names(folder, "query"))
    emb = embeddings_from_arrow(pa.concat_tables(train).column("embedding"))
    scale = background_scale(embeddings_from_arrow(queries.column("embedding")), emb)
    return Member(key, cands, bias_table(queries, emb, neighbours), scale)


def before_setting(cfg: PipelineConfig) -> Setting:
    norm = cfg.search.normalize
    return Setting(norm.beta if norm.enabled else 0.0, cfg.fuse.rule, dict(cfg.fuse.thresholds),
                   dict(cfg.fuse.calibration))


@dataclass(frozen=True)
class Threshold:
    """The is-copy threshold: the final score at which the split's predictions reach ``precision``."""

    value: float | None  # None: precision never got there on the split
    precision: float
    recall: float  # on the split, at ``value``
    verified: bool  # calibrated on verified scores (verify.enabled)


def calibrate_threshold(cfg: PipelineConfig, vcfg: PipelineConfig, members: Sequence[Member], gt: GT,
                        setting: Setting) -> Threshold:
    """Fuse the split as the tuned run will (and verify it when ``cfg`` verifies), then read off the
    score whose precision is ``fuse.threshold_precision`` (:func:`threshold_at_precision`)."""
    preds = final_predictions(members, setting, cfg.fuse.k)
    if cfg.verify.enabled:  # the verify stage itself, on the split's run folder
        run = RunDir(vcfg.output)
        write_table(preds, run.fused)
        run_verify(vcfg.model_copy(update={"verify": cfg.verify}), run)
        preds = read_predictions(run.predictions)
    else:
        preds = demote_others(preds, cfg.fuse.demote_others)  # as the fuse stage's predictions.csv
    m = evaluate_table(gt, preds)
    value, recall = threshold_at_precision(m, cfg.fuse.threshold_precision)
    return Threshold(value, cfg.fuse.threshold_precision, recall, cfg.verify.enabled)


def tune_on_split(cfg: PipelineConfig, split: Split, run_dir: str, beta_grid: Sequence[float],
                  address: str | None = None) -> tuple[TuneResult, Threshold | None]:
    """Run manifest .. search on ``split`` under ``run_dir/tune/run``, tune from its candidates, then
    calibrate the is-copy threshold on the tuned setting's final scores (not with
    ``fuse.threshold: auto``, which each run estimates itself)."""
    vcfg = validation_config(cfg, split, join(run_dir, "tune", "run"))
    run_stages(vcfg, TUNE_STAGES, address)
    gt = read_ground_truth(split.ground_truth)
    if not gt:
        raise ValueError(f"{split.ground_truth}: no (query, reference) pairs; nothing to tune on")
    run = RunDir(vcfg.output)
    members = [load_member(run, key, cfg.search.normalize.neighbours) for key in vcfg.search_keys()]
    if cfg.search.normalize.enabled and "train" in cfg.data.folders() and not normalisable(members):
        raise ValueError(f"tune: the config normalises scores against its train photos, but the validation split's "
                         f"background ({split.train or 'none'}) has fewer train descriptors than the "
                         f"{background_needed(cfg.search.normalize.neighbours)} it needs (search.normalize."
                         f"neighbours={cfg.search.normalize.neighbours}; 2 at least): its scores would not be "
                         "the run's; give the split more background photos (--background)")
    result = tune_members(members, gt, before_setting(cfg), beta_grid, Ranking(cfg.fuse.k, cfg.fuse.demote_others))
    return result, None if cfg.decoys() else calibrate_threshold(cfg, vcfg, members, gt, result.chosen)


# ---------------------------------------------------------------- output

def tuned_values(result: TuneResult, threshold: Threshold | None = None) -> dict[str, Any]:
    """Dotted config key -> tuned value (only the keys tuned, when the tuned setting is adopted)."""
    out: dict[str, Any] = {"fuse.threshold": threshold.value} if threshold is not None else {}
    if not result.adopted:
        return out
    if result.tuned_beta:
        out["search.normalize.enabled"] = result.after.beta > 0
        out["search.normalize.beta"] = result.after.beta
    if result.tuned_fusion:
        out["fuse.rule"] = result.after.rule
        out["fuse.thresholds"] = dict(result.after.thresholds)
        out["fuse.calibration"] = dict(result.after.factors)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_threshold(t: Threshold) -> str:
    """One line: the calibrated is-copy threshold and what it gave on the split."""
    scores = "verified scores" if t.verified else "fused scores"
    if t.value is None:
        return f"fuse.threshold: none (precision never reached {t.precision:g} on the split's {scores})"
    return f"fuse.threshold {t.value:.4f}: precision {t.precision:g} at recall {t.recall:.4f} on the split's {scores}"


def format_table(result: TuneResult) -> str:
    """Before/after settings and μAP on the validation split, one row per member and the ensemble."""
    b, a = result.before, result.after
    rows = [("", "before", "after"), ("search.normalize.beta", f"{b.beta:g}", f"{a.beta:g}")]
    if result.tuned_fusion:
        rows += [("fuse.rule", b.rule, a.rule),
                 *((f"fuse.thresholds.{m}", f"{b.thresholds[m]:.4f}" if m in b.thresholds else "-", f"{t:.4f}")
                   for m, t in a.thresholds.items()),
                 *((f"fuse.calibration.{m}", f"{b.factors[m]:.4f}" if m in b.factors else "-", f"{f:.4f}")
                   for m, f in a.factors.items())]
    rows += [(f"μAP {m}", _fmt(result.members_before[m]), _fmt(result.members_after[m]))
             for m in result.members_before]
    rows.append(("μAP ensemble" if len(result.members_before) > 1 else "μAP", _fmt(result.map_before),
                 _fmt(result.map_after)))
    given, tuned = result.held_out or (None, None)
    rows.append((f"  on held-out queries ({HELD_OUT_FOLDS} folds)", _fmt(given), _fmt(tuned)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    table = "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows)
    if result.adopted:
        return table
    if result.held_out is None:
        return table + "\nkept the given setting: too few copies to check the tuned one on held-out queries"
    return table + "\nkept the given setting: the tuned one did no better on held-out queries"


def format_subsets(result: TuneResult) -> str:
    """The max over each subset of members on the split, best first."""
    rows = sorted(result.subsets.items(), key=lambda kv: (-kv[1], len(kv[0])))
    return "\n".join([f"μAP of the max over each subset of members (beta {result.after.beta:g}):",
                      *(f"  {v:.4f}  {' + '.join(keys)}" for keys, v in rows)])


def write_tuned_config(source: str, overrides: Sequence[str], values: Mapping[str, Any], path: str,
                       header: Sequence[str]) -> str:
    """``source``'s YAML with ``overrides`` then ``values`` set, behind a ``#`` header, atomically.

    The result is validated before it is written, so ``copydet run path`` accepts it.
    """
    raw = pinned_paths(apply_overrides(read_yaml(source), list(overrides), PipelineConfig))  # flat, standalone
    for key, value in values.items():
        set_key(raw, key, value)
    validate(raw, path)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    with atomic_output(path) as f:
        f.write(text.encode())
    return path


def provenance(source: str, split: Split, result: TuneResult, overrides: Sequence[str],
               threshold: Threshold | None = None, given: PipelineConfig | None = None) -> list[str]:
    """The comment header of a tuned config: where it came from, what it scored, whether the tuned
    setting was adopted, and the keys written (those equal to ``given``'s marked unchanged)."""
    lines = [f"Tuned by `copydet tune` from {source} on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
             f"Validation split ({split.description}); the evaluation queries and ground truth were not used."]
    if overrides:
        lines.append("Overrides: " + " ".join(overrides))
    held, tuned = result.held_out or (None, None)
    held_out = f"on queries held out of the tuning {_fmt(held)} (as given) -> {_fmt(tuned)} (tuned)"
    if result.adopted:
        lines.append(f"Validation μAP: {_fmt(result.map_before)} (as given) -> {_fmt(result.map_after)} (tuned, "
                     f"adopted); {held_out}")
    else:
        lines.append(f"Validation μAP: {_fmt(result.map_before)} with the given setting, kept (the tuned one: "
                     f"{_fmt(result.map_after)} on the split; {held_out})")
    values = tuned_values(result, threshold)
    same = {k for k, v in values.items() if given is not None and reduce(getattr, k.split("."), given) == v}
    lines.append("keys set: " + (", ".join(k + " (unchanged)" * (k in same) for k in values) or "none"))
    if threshold is not None:
        lines.append(format_threshold(threshold))
    return lines
