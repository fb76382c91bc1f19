"""Fusion parameters picked on a validation split with known ground truth.

Everything here scores candidate settings with the real pipeline functions (normalisation,
:func:`ensemble.fuse.fuse`, :func:`ensemble.fuse.top_k_per_query` and
:func:`ensemble.fuse.demote_others` (:class:`Ranking`), :func:`core.metrics.evaluate`), so a tuned
setting is exactly what the run will do.
Ties keep the earlier setting: the untuned start for thresholds, the smaller beta for beta,
the simpler fusion (uncalibrated before calibrated, max before mean before threshold rules).
:func:`tune_members` tunes a whole ensemble: one beta, then whether members are calibrated onto
one scale (:mod:`ensemble.calibrate`), the rule and per-member thresholds; :func:`held_out_maps` says
what those choices are worth on queries they were not made on.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.metrics import Metrics, evaluate_table
from ensemble.calibrate import member_factors
from ensemble.fuse import calibrate, demote_others, fuse, max_over_patches, top_k_per_query
from ensemble.normalize import normalize_scores

log = logging.getLogger(__name__)

GT = Sequence[tuple[str, str]]
THRESHOLD_RULES = ("completeness", "confidence")  # fusion rules with thresholds worth tuning
DEFAULT_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
MAX_SUBSET_MEMBERS = 6  # every subset is scored up to this many members (63 subsets)
HELD_OUT_FOLDS = 2


@dataclass(frozen=True)
class Ranking:
    """How the fuse stage turns image-level scores into predictions: the top ``k`` per query, each
    query's others lowered by ``demote`` (``fuse.demote_others``, :func:`demote_others`). Every
    setting is scored on predictions ranked so, as the run writes them: demotion reorders queries
    against each other, so a choice scored without it is scored on another ranking."""

    k: int = 10
    demote: float = 0.0

    def __call__(self, pred: pa.Table) -> pa.Table:
        return demote_others(top_k_per_query(pred, self.k), self.demote)


def predictions_map(pred: pa.Table, gt: GT, ranking: Ranking = Ranking()) -> float:
    """μAP of image-level ``(query_id, reference_id, score)`` predictions, ranked by ``ranking``."""
    return evaluate_table(gt, ranking(pred)).micro_ap


def fused_map(per_model: pa.Table, gt: GT, thresholds: Mapping[str, float], rule: str,
              ranking: Ranking = Ranking(), factors: Mapping[str, float] | None = None) -> float:
    """μAP of the fused predictions for one setting of the calibration, thresholds and rule."""
    return predictions_map(fuse(per_model, thresholds, rule, factors), gt, ranking)


def quantile_grid(per_model: pa.Table, levels: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, list[float]]:
    """Per model, the distinct quantiles of its scores at ``levels`` (candidate thresholds)."""
    out = {}
    for model in sorted(set(per_model.column("model").to_pylist())):
        s = per_model.filter(pc.equal(per_model.column("model"), model)).column("score").to_numpy()
        out[model] = sorted({float(v) for v in np.quantile(s.astype(np.float64), levels, method="lower")})
    return out


def tune_thresholds(per_model: pa.Table, gt: GT, rule: str,
                    grid: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_QUANTILES,
                    ranking: Ranking = Ranking(), max_rounds: int = 5) -> dict[str, float]:
    """Per-model thresholds maximising μAP under ``rule``, by coordinate ascent.

    ``per_model`` has columns query_id, reference_id, model, score (image level, e.g. from
    :func:`max_over_patches`). ``grid`` is either quantile levels, turned into thresholds per
    model from its own scores, or explicit candidate thresholds per model. Starting from each
    model's lowest candidate, one model at a time moves to its best candidate with the others
    fixed; rounds repeat until nothing improves (or ``max_rounds``).
    """
    if per_model.num_rows == 0:
        raise ValueError("tune_thresholds: no scores to tune on")
    cands = {m: sorted(float(t) for t in v) for m, v in grid.items()} if isinstance(grid, Mapping) \
        else quantile_grid(per_model, grid)
    empty = [m for m, v in cands.items() if not v]
    if empty:
        raise ValueError(f"tune_thresholds: no candidate thresholds for {empty}")
    best = {m: v[0] for m, v in cands.items()}
    best_map = fused_map(per_model, gt, best, rule, ranking)
    for _ in range(max_rounds):
        improved = False
        for model, values in cands.items():
            for t in values:
                trial = {**best, model: t}
                score = fused_map(per_model, gt, trial, rule, ranking)
                if score > best_map:
                    best, best_map, improved = trial, score, True
        if not improved:
            break
    return best


def tune_beta(candidates: pa.Table, bias: pa.Table, gt: GT, grid: Sequence[float],
              ranking: Ranking = Ranking()) -> tuple[float, float]:
    """``(beta, μAP)``: the normalisation beta of ``grid`` whose predictions score best.

    ``candidates`` are one member's patch-level candidates, ``bias`` its query patches'
    neighbour similarities (:func:`ensemble.normalize.bias_table`); each beta is scored as
    normalise -> max over patches -> ``ranking``.
    """
    if not grid:
        raise ValueError("tune_beta: empty beta grid")
    results = []
    for beta in grid:
        pairs = max_over_patches(normalize_scores(candidates, bias, beta).drop_columns(
            [c for c in ("model",) if c in candidates.column_names]))
        results.append((predictions_map(pairs, gt, ranking), -float(beta)))
    best_map, neg_beta = max(results)
    return -neg_beta, best_map


@dataclass(frozen=True)
class Member:
    """One model@scale on the validation split: raw patch candidates and query-patch biases."""

    key: str
    candidates: pa.Table
    bias: pa.Table | None  # None: no train features to normalise against
    scale: float | None = None  # tail scale of its background similarities (ensemble.calibrate)


@dataclass(frozen=True)
class Setting:
    beta: float  # 0: scores not normalised
    rule: str
    thresholds: dict[str, float]
    factors: dict[str, float] = field(default_factory=dict)  # fuse.calibration


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
    subsets: dict[tuple[str, ...], float] = field(default_factory=dict)  # :func:`subset_maps` at the tuned beta
    held_out: tuple[float | None, float] | None = None  # :func:`held_out_maps`: (as given, tuned)

    @property
    def adopted(self) -> bool:
        """Whether the tuned setting replaces the given one: only when it did better than the
        given one on held-out queries (a gain on the split alone is fitted, not learnt), or when
        the given one cannot run. Without a held-out check (too few copies) the given one stays."""
        if self.map_before is None:
            return True
        return self.held_out is not None and (self.held_out[0] is None or self.held_out[1] > self.held_out[0])

    @property
    def chosen(self) -> Setting:
        return self.after if self.adopted else self.before


def per_model_scores(members: Sequence[Member], beta: float) -> pa.Table:
    """Image-level ``(query_id, reference_id, score, model)`` of every member, normalised by ``beta``."""
    return pa.concat_tables([max_over_patches(normalize_scores(m.candidates, m.bias, beta)
                                              if m.bias is not None and beta else m.candidates) for m in members])


def setting_map(members: Sequence[Member], gt: GT, s: Setting, ranking: Ranking) -> float:
    """μAP of ``s`` as the fuse stage would apply it."""
    return fused_map(per_model_scores(members, s.beta), gt, s.thresholds, s.rule, ranking, s.factors)


def scorable_map(members: Sequence[Member], gt: GT, s: Setting, ranking: Ranking) -> float | None:
    """:func:`setting_map`, or None when ``s`` cannot run (e.g. rule 'confidence' without thresholds)."""
    try:
        return setting_map(members, gt, s, ranking)
    except ValueError as e:
        log.warning(f"tune: the configured fusion cannot be scored ({e})")
        return None


def final_predictions(members: Sequence[Member], s: Setting, k: int) -> pa.Table:
    """The fused scores the fuse stage keeps under ``s``: top ``k`` per query, not yet demoted
    (``fused.parquet``, which verification re-scores before the demotion)."""
    return top_k_per_query(fuse(per_model_scores(members, s.beta), s.thresholds, s.rule, s.factors), k)


def subset_maps(members: Sequence[Member], gt: GT, beta: float, ranking: Ranking) -> dict[tuple[str, ...], float]:
    """μAP of the max over each subset of ``members`` (2 to :data:`MAX_SUBSET_MEMBERS` of them;
    else none): which members earn their cost on the split, e.g. which scales to keep."""
    if not 2 <= len(members) <= MAX_SUBSET_MEMBERS:
        return {}
    per_model = per_model_scores(members, beta)
    keys = [m.key for m in members]
    return {subset: fused_map(per_model.filter(pc.is_in(per_model.column("model"), pa.array(subset))), gt, {}, "max",
                              ranking)
            for n in range(1, len(keys) + 1) for subset in combinations(keys, n)}


def threshold_at_precision(m: Metrics, precision: float) -> tuple[float | None, float]:
    """``(score threshold, recall)`` of the largest recall whose precision is at least ``precision``
    (ISC21's R@P90 operating point for 0.9); ``(None, 0.0)`` when precision never gets there."""
    ok = m.precisions >= precision
    if not ok.any():
        return None, 0.0
    best = int(np.argmax(np.where(ok, m.recalls, -1.0)))
    return float(m.thresholds[best]), float(m.recalls[best])


def _offset_patches(m: Member, offset: int) -> Member:
    """``m`` with its query patch ids shifted, so several members fit in one bias table."""
    def shift(t: pa.Table, col: str) -> pa.Table:
        i = t.schema.get_field_index(col)
        return t.set_column(i, t.schema.field(i), pc.add(t.column(col), pa.scalar(offset, pa.int32())))
    return Member(m.key, shift(m.candidates, "query_patch"), shift(m.bias, "patch_id"), m.scale)


def joint_beta(members: Sequence[Member], gt: GT, grid: Sequence[float], ranking: Ranking) -> tuple[float, float]:
    """One beta for all members, scored under max fusion (:func:`tune_beta`).

    With query patch ids offset per member, the max over patches of all members' candidates
    together is the max over models, so one ``tune_beta`` call scores the whole ensemble.
    """
    step = 1 + max(int(pc.max(m.bias.column("patch_id")).as_py() or 0) for m in members)
    shifted = [_offset_patches(m, i * step) for i, m in enumerate(members)]
    return tune_beta(pa.concat_tables([m.candidates for m in shifted]),
                     pa.concat_tables([m.bias for m in shifted]), gt, grid, ranking)


def tune_fusion(members: Sequence[Member], gt: GT, start: Setting, ranking: Ranking) -> Setting:
    """The best of: uncalibrated or calibrated members (when every member has a background scale),
    fused by max, mean, or a threshold rule with tuned thresholds (μAP; ties keep the earlier)."""
    per_model = per_model_scores(members, start.beta)
    calibrations = [{}]
    if all(m.scale for m in members):
        factors = member_factors({m.key: m.scale for m in members})
        calibrations.append({k: round(v, 4) for k, v in factors.items()})  # as the tuned config will hold them
    best: tuple[float, Setting] | None = None
    for factors in calibrations:
        options = [("max", {}), ("mean", {})]
        calibrated = calibrate(per_model, factors)  # thresholds apply to calibrated scores
        options += [(rule, tune_thresholds(calibrated, gt, rule, ranking=ranking)) for rule in THRESHOLD_RULES]
        for rule, th in options:
            score = fused_map(per_model, gt, th, rule, ranking, factors)
            if best is None or score > best[0]:
                best = (score, replace(start, rule=rule, thresholds=th, factors=dict(factors)))
    return best[1]


def normalisable(members: Sequence[Member]) -> bool:
    """Whether beta can be tuned: every member has train biases to normalise against."""
    return all(m.bias is not None for m in members)


def tune_setting(members: Sequence[Member], gt: GT, before: Setting, beta_grid: Sequence[float],
                 ranking: Ranking) -> Setting:
    """Beta (when every member has train biases, else 0: raw scores), then thresholds + rule (>= 2 members)."""
    after = replace(before, beta=joint_beta(members, gt, beta_grid, ranking)[0] if normalisable(members) else 0.0)
    return tune_fusion(members, gt, after, ranking) if len(members) > 1 else after


def query_fold(query_id: str, folds: int) -> int:
    """A query's fold: a hash of its id, so the folds do not depend on the order of the files."""
    return zlib.crc32(query_id.encode()) % folds


def restrict(m: Member, queries: set[str]) -> Member:
    """``m`` on ``queries`` only: their candidates and their query patches' biases."""
    keep = pa.array(sorted(queries), pa.string())
    bias = None if m.bias is None else m.bias.filter(pc.is_in(m.bias.column("image_id"), keep))
    return Member(m.key, m.candidates.filter(pc.is_in(m.candidates.column("query_id"), keep)), bias, m.scale)


def held_out_maps(members: Sequence[Member], gt: GT, before: Setting, beta_grid: Sequence[float], ranking: Ranking,
                  folds: int = HELD_OUT_FOLDS) -> tuple[float | None, float] | None:
    """``(as given, tuned)`` μAP on queries the tuning did not see: the split's queries in ``folds``
    folds by a hash of the id, each fold scored with ``before`` and with the setting
    :func:`tune_setting` picks on the other folds, then averaged over the folds (each fold ranked
    under one setting, as a run is). The tuned μAP of :func:`tune_members` is measured on the
    queries it was tuned on and flatters every choice; this one does not. None when a fold or its
    complement has no copies."""
    queries = {q for q, _ in gt}.union(*(m.candidates.column("query_id").to_pylist() for m in members))
    given, tuned = [], []  # a copy no member retrieved counts as missed in its fold, as on the whole split
    for f in range(folds):
        held = {q for q in queries if query_fold(q, folds) == f}
        seen = queries - held
        seen_gt, held_gt = [p for p in gt if p[0] in seen], [p for p in gt if p[0] in held]
        if not seen_gt or not held_gt:
            return None
        s = tune_setting([restrict(m, seen) for m in members], seen_gt, before, beta_grid, ranking)
        on_held = [restrict(m, held) for m in members]
        given.append(scorable_map(on_held, held_gt, before, ranking))
        tuned.append(setting_map(on_held, held_gt, s, ranking))
    return (None if None in given else float(np.mean(given))), float(np.mean(tuned))


def tune_members(members: Sequence[Member], gt: GT, before: Setting, beta_grid: Sequence[float],
                 ranking: Ranking) -> TuneResult:
    """Tune beta (when every member has train biases), then thresholds + rule (>= 2 members); with
    the tuned setting's μAP on the split and on held-out queries (:func:`held_out_maps`)."""
    tuned_beta = normalisable(members)
    after = tune_setting(members, gt, before, beta_grid, ranking)
    if not tuned_beta:  # what the run does without train features: raw scores
        before = replace(before, beta=0.0)
    result = TuneResult(
        before=before, after=after, map_before=scorable_map(members, gt, before, ranking),
        map_after=setting_map(members, gt, after, ranking),
        members_before={m.key: setting_map([m], gt, Setting(before.beta, "max", {}), ranking) for m in members},
        members_after={m.key: setting_map([m], gt, Setting(after.beta, "max", {}), ranking) for m in members},
        tuned_beta=tuned_beta, tuned_fusion=len(members) > 1, subsets=subset_maps(members, gt, after.beta, ranking),
        held_out=held_out_maps(members, gt, before, beta_grid, ranking))
    if result.held_out is None and not result.adopted:
        log.warning("tune: too few copies to hold queries out of the tuning (a fold without copies): keeping the "
                    "given setting; give the split more photos")
    elif not result.adopted:
        log.info(f"tune: on held-out queries the tuned setting scores {result.held_out[1]:.4f} μAP, the given one "
                 f"{result.held_out[0]:.4f}: keeping the given one")
    return result
