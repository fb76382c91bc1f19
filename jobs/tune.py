"""``copydet tune``: pick beta, fusion thresholds and rule on a validation split, never the evaluation set.

1. A validation split: user-given queries + ground truth against the config's references (and
   train/), or a synthetic one cut from the config's *training* photos with an augmentation
   recipe (:func:`make_synthetic_split`).
2. The pipeline's own stages (manifest .. search, raw scores) run on it under ``RUN_DIR/tune/run``.
3. From its candidates, :mod:`ensemble.tune` picks beta and, with >= 2 members, the per-member
   thresholds and the rule (:func:`tune_members`); :func:`write_tuned_config` writes the input
   YAML with those values set, which ``copydet run`` then uses unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ensemble.fuse import max_over_patches
from ensemble.metrics import read_ground_truth
from ensemble.normalize import bias_table, normalize_scores
from ensemble.store import atomic_output, embeddings_from_arrow, join, read_table
from ensemble.tune import GT, fused_map, predictions_map, tune_beta, tune_thresholds
from jobs.config import PipelineConfig, parse_overrides, set_key, validate
from jobs.layout import RunDir, shard_names
from jobs.pipeline import run_stages
from jobs.runtime import say
from patchers.imageio import ImageDecodeError, load_rgb
from patchers.manifest import scan_folder
from pretrain.recipes import get_recipe

TUNE_STAGES = ("manifest", "patch", "extract", "search")
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
RULES = ("completeness", "confidence")  # fusion rules with thresholds worth tuning
DEFAULT_PHOTOS = 400  # held-out train photos when --photos is not given (at most half of train/)
FULL_STRENGTH_EPOCH = 10**6  # past any recipe's ramp: edits at full strength
QUERY_JPEG_QUALITY = 90


@dataclass(frozen=True)
class SplitSpec:
    """How a synthetic split is cut: ``photos`` held-out train photos edited with ``recipe``."""

    photos: int | None = None
    recipe: str = "basic"
    seed: int = 0
    background: int | None = None  # train photos kept for normalisation (None: all the rest)


@dataclass(frozen=True)
class ValidationSplit:
    """The folders one tuning run reads, and a line saying where they came from."""

    queries: str
    ground_truth: str
    references: str
    train: str | None
    description: str
    limit: int | None = None


# ---------------------------------------------------------------- validation split

def user_split(cfg: PipelineConfig, queries: str, ground_truth: str) -> ValidationSplit:
    """User-given validation queries + ground truth against the config's references and train/."""
    for p in (queries, ground_truth):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: no such validation file or folder")
    folders = cfg.data.folders()
    if "reference" not in folders:
        raise ValueError("tune: the config names no references folder to validate against")
    same = [p for p, q in ((queries, folders.get("query")), (ground_truth, cfg.data.ground_truth_path()))
            if q and os.path.realpath(p) == os.path.realpath(q)]
    if same:
        raise ValueError(f"tune: {same[0]} is the config's evaluation data; tune on a separate validation set")
    return ValidationSplit(queries, ground_truth, folders["reference"], folders.get("train"),
                           f"user-given: queries {queries}, ground truth {ground_truth}", cfg.data.limit)


def _spec_record(spec: SplitSpec, train_folder: str) -> dict:
    return {**asdict(spec), "train": os.path.realpath(train_folder)}


def _paths(out_dir: str, record: dict) -> ValidationSplit:
    train = join(out_dir, "train")
    desc = (f"synthetic: {record['photos']} held-out photos of {record['train']} "
            f"(recipe {record['recipe']}, seed {record['seed']}) in {out_dir}")
    return ValidationSplit(join(out_dir, "queries"), join(out_dir, "ground_truth.csv"), join(out_dir, "references"),
                           train if os.listdir(train) else None, desc)


def make_synthetic_split(train_folder: str, out_dir: str, spec: SplitSpec) -> ValidationSplit:
    """A validation split made from training photos only; deterministic in ``spec.seed``.

    ``photos`` train photos are held out: half become references, and recipe copies of half of
    those are the positive queries (the rest are distractor references); recipe edits of the
    other half are negative queries (their originals are nowhere in the split). The remaining
    train photos are the normalisation background (symlinked). The split appears atomically
    with a ``split.json``; a later call with the same spec reuses it.
    """
    photos, out_dir = scan_folder(train_folder), os.path.abspath(out_dir)
    n = spec.photos if spec.photos is not None else min(DEFAULT_PHOTOS, len(photos) // 2)
    if not 2 <= n < len(photos):
        raise ValueError(f"tune: --photos must be in [2, {len(photos) - 1}] for the {len(photos)} "
                         f"photos of {train_folder}, got {n}")
    record = _spec_record(replace(spec, photos=n), train_folder)
    marker = join(out_dir, "split.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            old = json.load(f)
        if old != record:
            raise ValueError(f"{out_dir} holds a split made with {old}, not {record}; "
                             f"remove it or tune into another --out")
        say(f"tune: reusing the validation split in {out_dir}")
        return _paths(out_dir, record)
    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir} exists but has no split.json; remove it or tune into another --out")

    recipe = get_recipe(spec.recipe)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(photos))
    held, used = [], 0  # decodable photos only; decoded again when edited, to keep memory flat
    for i in order:
        if len(held) == n:
            break
        used += 1
        try:
            load_rgb(photos[i][1])
            held.append(photos[i])
        except ImageDecodeError as e:
            say(f"tune: skipping train photo {photos[i][1]}: {e}")
    if len(held) < n:
        raise ValueError(f"tune: only {len(held)} of the photos in {train_folder} decode; need {n}")
    background = [photos[i] for i in order[used:]][:spec.background]

    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("references", "queries", "train"):
        os.makedirs(join(tmp, sub))
    n_refs = n // 2
    queries = []  # (source image id, path, reference id or "" for a negative)
    for j, (image_id, path) in enumerate(held[:n_refs]):
        ref_id = f"R{j:05d}"
        shutil.copyfile(path, join(tmp, "references", ref_id + Path(path).suffix.lower()))
        if j < (n_refs + 1) // 2:
            queries.append((image_id, path, ref_id))
    queries += [(image_id, path, "") for image_id, path in held[n_refs:]]
    gt = ["query_id,reference_id"]
    for q, at in enumerate(rng.permutation(len(queries))):
        image_id, path, ref_id = queries[at]
        copy = recipe(load_rgb(path), seed=spec.seed, key=image_id, epoch=FULL_STRENGTH_EPOCH)
        copy.save(join(tmp, "queries", f"Q{q:05d}.jpg"), quality=QUERY_JPEG_QUALITY)
        gt.append(f"Q{q:05d},{ref_id}")
    for image_id, path in background:
        link = Path(tmp, "train", image_id + Path(path).suffix)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.realpath(path))
    Path(tmp, "ground_truth.csv").write_text("\n".join(gt) + "\n")
    Path(tmp, "split.json").write_text(json.dumps(record, indent=2))
    os.replace(tmp, out_dir)
    say(f"tune: synthetic split: {n_refs} references, {len(queries)} queries "
        f"({(n_refs + 1) // 2} copies), {len(background)} background photos -> {out_dir}")
    return _paths(out_dir, record)


def validation_config(cfg: PipelineConfig, split: ValidationSplit, output: str) -> PipelineConfig:
    """``cfg`` pointed at the split, writing to ``output``, with raw scores (beta is tuned later)."""
    raw = cfg.model_dump(mode="json")
    raw["data"] = {"root": None, "train": split.train, "references": split.references, "queries": split.queries,
                   "ground_truth": split.ground_truth, "limit": split.limit}
    raw["output"] = output
    raw["search"]["normalize"]["enabled"] = False
    raw["verify"]["enabled"] = False
    return validate(raw, "tune validation config")


# ---------------------------------------------------------------- tuning

@dataclass(frozen=True)
class Member:
    """One model@scale on the validation split: raw patch candidates and query-patch biases."""

    key: str
    candidates: pa.Table
    bias: pa.Table | None  # None: no train features to normalise against


@dataclass(frozen=True)
class Setting:
    beta: float  # 0: scores not normalised
    rule: str
    thresholds: dict[str, float]


@dataclass(frozen=True)
class TuneResult:
    before: Setting
    after: Setting
    map_before: float | None  # None: the configured setting cannot run (e.g. a rule without thresholds)
    map_after: float
    members_before: dict[str, float]
    members_after: dict[str, float]
    tuned_beta: bool
    tuned_fusion: bool


def load_member(run: RunDir, key: str, neighbours: int) -> Member:
    """Candidates of ``key`` plus the bias of every query patch against the run's train features."""
    folder = run.features(key)
    cands = read_table(run.candidates(key))
    train = [read_table(join(folder, n), ["embedding"]) for n in shard_names(folder, "train")]
    rows = sum(t.num_rows for t in train)
    if rows < neighbours:
        say(f"tune: {key}: {rows} train descriptors < search.normalize.neighbours={neighbours}; beta not tuned")
        return Member(key, cands, None)
    queries = pa.concat_tables(read_table(join(folder, n), ["image_id", "patch_id", "embedding"])
                               for n in shard_names(folder, "query"))
    emb = embeddings_from_arrow(pa.concat_tables(train).column("embedding"))
    return Member(key, cands, bias_table(queries, emb, neighbours))


def per_model_scores(members: Sequence[Member], beta: float) -> pa.Table:
    """Image-level ``(query_id, reference_id, score, model)`` of every member, normalised by ``beta``."""
    return pa.concat_tables([max_over_patches(normalize_scores(m.candidates, m.bias, beta)
                                              if m.bias is not None and beta else m.candidates) for m in members])


def setting_map(members: Sequence[Member], gt: GT, s: Setting, k: int) -> float:
    """μAP of ``s`` as the fuse stage would apply it (no rule filter for one member without thresholds)."""
    per_model = per_model_scores(members, s.beta)
    if len(members) > 1 or s.thresholds:
        return fused_map(per_model, gt, s.thresholds, s.rule, k)
    return predictions_map(per_model.select(["query_id", "reference_id", "score"]), gt, k)


def _offset_patches(m: Member, offset: int) -> Member:
    """``m`` with its query patch ids shifted, so several members fit in one bias table."""
    def shift(t: pa.Table, col: str) -> pa.Table:
        i = t.schema.get_field_index(col)
        return t.set_column(i, t.schema.field(i), pc.add(t.column(col), pa.scalar(offset, pa.int32())))
    return Member(m.key, shift(m.candidates, "query_patch"), shift(m.bias, "patch_id"))


def joint_beta(members: Sequence[Member], gt: GT, grid: Sequence[float], k: int) -> tuple[float, float]:
    """One beta for all members, scored under max fusion (:func:`ensemble.tune.tune_beta`).

    With query patch ids offset per member, the max over patches of all members' candidates
    together is the max over models, so one ``tune_beta`` call scores the whole ensemble.
    """
    step = 1 + max(int(pc.max(m.bias.column("patch_id")).as_py() or 0) for m in members)
    shifted = [_offset_patches(m, i * step) for i, m in enumerate(members)]
    return tune_beta(pa.concat_tables([m.candidates for m in shifted]),
                     pa.concat_tables([m.bias for m in shifted]), gt, grid, k)


def tune_members(members: Sequence[Member], gt: GT, before: Setting, beta_grid: Sequence[float],
                 k: int) -> TuneResult:
    """Tune beta (when every member has train biases), then thresholds + rule (>= 2 members)."""
    def maybe_map(s: Setting) -> float | None:
        try:
            return setting_map(members, gt, s, k)
        except ValueError as e:  # e.g. rule 'confidence' with no thresholds yet
            say(f"tune: the configured fusion cannot be scored ({e})")
            return None

    tuned_beta = all(m.bias is not None for m in members)
    beta = joint_beta(members, gt, beta_grid, k)[0] if tuned_beta else before.beta
    after = replace(before, beta=beta if tuned_beta else 0.0)
    tuned_fusion = len(members) > 1
    if tuned_fusion:
        per_model = per_model_scores(members, after.beta)
        rules = sorted(RULES, key=lambda r: r != before.rule)  # ties keep the configured rule
        best = None
        for rule in rules:
            th = tune_thresholds(per_model, gt, rule, k=k)
            score = fused_map(per_model, gt, th, rule, k)
            if best is None or score > best[0]:
                best = (score, rule, th)
        after = replace(after, rule=best[1], thresholds=best[2])
    if not tuned_beta:  # what the run does without train features: raw scores
        before = replace(before, beta=0.0)
    return TuneResult(
        before=before, after=after, map_before=maybe_map(before), map_after=setting_map(members, gt, after, k),
        members_before={m.key: setting_map([m], gt, Setting(before.beta, "max", {}), k) for m in members},
        members_after={m.key: setting_map([m], gt, Setting(after.beta, "max", {}), k) for m in members},
        tuned_beta=tuned_beta, tuned_fusion=tuned_fusion)


def before_setting(cfg: PipelineConfig) -> Setting:
    norm = cfg.search.normalize
    return Setting(norm.beta if norm.enabled else 0.0, cfg.fuse.rule, dict(cfg.fuse.thresholds))


def tune_on_split(cfg: PipelineConfig, split: ValidationSplit, run_dir: str, beta_grid: Sequence[float],
                  address: str | None = None) -> TuneResult:
    """Run manifest .. search on ``split`` under ``run_dir/tune/run``, then tune from its candidates."""
    vcfg = validation_config(cfg, split, join(run_dir, "tune", "run"))
    run_stages(vcfg, TUNE_STAGES, address)
    gt = read_ground_truth(split.ground_truth)
    if not gt:
        raise ValueError(f"{split.ground_truth}: no (query, reference) pairs; nothing to tune on")
    run = RunDir(vcfg.output)
    members = [load_member(run, key, cfg.search.normalize.neighbours) for key in vcfg.search_keys()]
    return tune_members(members, gt, before_setting(cfg), beta_grid, cfg.fuse.k)


# ---------------------------------------------------------------- output

def tuned_values(result: TuneResult) -> dict[str, Any]:
    """Dotted config key -> tuned value (only the keys that were tuned)."""
    out: dict[str, Any] = {}
    if result.tuned_beta:
        out["search.normalize.enabled"] = result.after.beta > 0
        out["search.normalize.beta"] = result.after.beta
    if result.tuned_fusion:
        out["fuse.rule"] = result.after.rule
        out["fuse.thresholds"] = dict(result.after.thresholds)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_table(result: TuneResult) -> str:
    """Before/after settings and μAP on the validation split, one row per member and the ensemble."""
    b, a = result.before, result.after
    rows = [("", "before", "after"), ("search.normalize.beta", f"{b.beta:g}", f"{a.beta:g}")]
    if result.tuned_fusion:
        rows += [("fuse.rule", b.rule, a.rule),
                 *((f"fuse.thresholds.{m}", f"{b.thresholds[m]:.4f}" if m in b.thresholds else "-", f"{t:.4f}")
                   for m, t in a.thresholds.items())]
    rows += [(f"μAP {m}", _fmt(result.members_before[m]), _fmt(result.members_after[m]))
             for m in result.members_before]
    rows.append(("μAP ensemble" if len(result.members_before) > 1 else "μAP", _fmt(result.map_before),
                 _fmt(result.map_after)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows)


def write_tuned_config(source: str, overrides: Sequence[str], values: Mapping[str, Any], path: str,
                       header: Sequence[str]) -> str:
    """``source``'s YAML with ``overrides`` then ``values`` set, behind a ``#`` header, atomically.

    The result is validated before it is written, so ``copydet run path`` accepts it.
    """
    with open(source) as f:
        raw = yaml.safe_load(f) or {}
    for key, value in [*parse_overrides(list(overrides)), *values.items()]:
        set_key(raw, key, value)
    validate(raw, path)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    with atomic_output(path) as f:
        f.write(text.encode())
    return path


def provenance(source: str, split: ValidationSplit, result: TuneResult, overrides: Sequence[str]) -> list[str]:
    """The comment header of a tuned config: where it came from and what it scored."""
    lines = [f"Tuned by `copydet tune` from {source} on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
             f"Validation split ({split.description}); the evaluation queries and ground truth were not used."]
    if overrides:
        lines.append("Overrides: " + " ".join(overrides))
    lines.append(f"Validation μAP: {_fmt(result.map_before)} (as given) -> {_fmt(result.map_after)} (tuned); "
                 "tuned keys: " + (", ".join(tuned_values(result)) or "none"))
    return lines
