"""The living reference index, composed: build (pipeline stages), remove, compact; ``add`` is
:mod:`jobs.adding`, ``match`` :mod:`jobs.matching`.

``build`` runs the pipeline's own manifest, patch, extract and reduce stages over references
(and train/, for normalisation and PCA) into a staging run folder, or takes a finished run's
features, and publishes them as a version (:mod:`ensemble.index.versions`). Here too are what
the other commands and the service share: an index's config (and the overrides it takes), its
reference embedder and the search keys' descriptors of a batch. Every command writes a whole new
version and switches ``CURRENT`` last.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from core.contracts import shard_split
from core.models.cards import ModelCard
from core.models.registry import load_card
from core.models.resolve import resolve_model
from core.settings import SettingsChanged
from core.store import exists, join, read_table
from core.yamlconf import apply_overrides, load_yaml
from ensemble.index import versions
from ensemble.index.layout import IndexDir
from ensemble.index.reader import read_cards, read_config
from jobs.completeness import require_features, require_manifest
from jobs.config import DataConfig, PipelineConfig, load_config, validate
from jobs.inputs import InputError, split_folders
from jobs.layout import RunDir
from jobs.lock import locked
from jobs.pipeline import run_stages
from jobs.stages.extract import key_specs
from jobs.stages.fuse import final_kind
from jobs.stages.reduce import derive
from jobs.threshold import recorded
from patchers.embed import ImageEmbedder
from patchers.plan import DetectorSpec

log = logging.getLogger(__name__)

BUILD_STAGES = ("manifest", "patch", "extract", "reduce")
MUTABLE = ("serve.", "index.", "ray.")  # config sections that do not change what an index answers
DETECTOR_CARD = "detector:{side}"  # cards of the copy-region detectors a side's views need


def config_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_mutable(overrides: Sequence[str], kept: str, rebuild: str) -> None:
    """Refuse overrides outside ``serve.*``, ``index.*`` and ``ray.*``: the others decide the
    answers, so they are fixed by what made the features (``kept``)."""
    fixed = [o for o in overrides if not o.split("=", 1)[0].startswith(MUTABLE)]
    if fixed:
        raise ValueError(f"{fixed}: {kept}; only {', '.join(m + '*' for m in MUTABLE)} can be changed here "
                         f"({rebuild} for the others)")


def index_config(root: str, version: str | None = None, overrides: Sequence[str] = ()) -> tuple[str, PipelineConfig]:
    """``(version, config)`` an index was built with, plus ``overrides`` (:func:`check_mutable`)."""
    check_mutable(overrides, "an index keeps the settings it was built with", "rebuild")
    version, text = read_config(root, version)
    return version, validate(apply_overrides(load_yaml(text), list(overrides), PipelineConfig),
                             f"{root}/versions/{version}/config.yaml")


def needs_train(cfg: PipelineConfig) -> bool:
    return cfg.search.normalize.enabled or cfg.reduce.active


def index_cards(cfg: PipelineConfig) -> dict[str, ModelCard]:
    """Feature key -> card of every member, and the cards of the detectors the views use."""
    cards = {key: resolve_model(e.name, cfg.registry, dim=e.dim, pool=e.pool) for e, _, key in cfg.model_keys()}
    for side in ("query", "reference"):
        name = getattr(cfg.patches, side).detector
        if name:
            cards[DETECTOR_CARD.format(side=side)] = load_card(name, cfg.registry)
    return cards


def served_threshold(cfg: PipelineConfig, run: RunDir) -> PipelineConfig:
    """``cfg`` with ``fuse.threshold: auto`` replaced by the number ``run`` estimated on its own
    queries' final scores (``threshold.json``), so the service's ``is_copy`` is calibrated too.
    Unchanged when the run has no estimate on the scores the service gives (then ``serve.threshold``)."""
    if not cfg.decoys():
        return cfg
    record = recorded(run)
    scores = final_kind(cfg)
    if record.get("threshold") is None or record.get("scores") != scores:
        log.warning(f"index: fuse.threshold auto, but {run.root} has no estimate on {scores} scores "
                    f"({_no_estimate(record, scores)}); "
                    f"the service's is_copy uses serve.threshold ({cfg.serve.threshold})")
        return cfg
    log.info(f"index: fuse.threshold auto -> {record['threshold']:.4f}, estimated by the run at precision "
             f"{record.get('target')} ({run.threshold})")
    return cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"threshold": float(record["threshold"])})})


def _no_estimate(record: dict, scores: str) -> str:
    """Why ``threshold.json``'s ``record`` gives no threshold on ``scores``."""
    if record.get("scores") not in (None, scores):
        return f"its estimate is on {record['scores']} scores"
    if "target" in record:
        return f"no score of its predictions reaches an estimated precision of {record['target']:g}"
    return "an index built from folders has no queries to make one"


def run_config(run_dir: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The config ``run_dir`` was made with, plus ``overrides`` (:func:`check_mutable`): its
    features, scores and threshold estimate hold for that config only."""
    check_mutable(overrides, f"an index built from {run_dir} answers as the run did",
                  "run the pipeline again with them, or build from folders")
    return load_config(Path(run_dir) / "config.yaml", list(overrides))


def build_from_run(run_dir: str, root: str, cfg: PipelineConfig | None = None) -> str:
    """Publish a finished run's reference (and train) features as a new version of ``root``,
    holding the run folder's lock (a run still writing there would publish a mix of shards)."""
    run = RunDir(run_dir)
    with locked(run):
        return _publish_run(run, root, cfg)


def _publish_run(run: RunDir, root: str, cfg: PipelineConfig | None) -> str:
    """Publish ``run``'s reference (and train) features, refusing a run whose features are not all
    there: an index missing a shard would never answer with its references."""
    asked = cfg or run_config(run.root)
    cfg = served_threshold(asked, run)
    curve = recorded(run).get("q_curve") if cfg is not asked else None  # with the run's threshold, its q-values
    require_manifest(run, "index build")
    splits = ("reference", "train") if needs_train(cfg) else ("reference",)
    keys = {}
    for key in cfg.search_keys():
        files = [join(run.features(key), n) for n in require_features(cfg, run, key, "index build", splits)]
        pca = run.pca(key)
        keys[key] = versions.KeySource(
            references=[f for f in files if shard_split(f) == "reference"],
            train=[f for f in files if shard_split(f) == "train"],
            pca=pca if cfg.reduce.dim and exists(pca) else None)
    manifest = read_table(run.manifest)
    refs = manifest.filter(pc.equal(manifest.column("split"), "reference"))
    images = refs.select(["image_id", "path", "sha256", "width", "height"])
    name = versions.build(IndexDir(root), config_yaml(cfg), index_cards(cfg), keys, images,
                          cfg.search.index_spec(), cfg.search.shard_size, curve)
    log.info(f"index: published {name} with {images.num_rows} references ({', '.join(keys)}) -> {root}")
    return name


def build_from_folders(cfg: PipelineConfig, root: str, address: str | None = None) -> str:
    """Run the extraction stages over the config's references (and train/) in a staging run
    folder inside ``root`` (resumable), then publish it."""
    folders = split_folders(cfg.data, ("reference",))
    staging = Path(root) / ".staging"
    data = DataConfig(references=folders["reference"], limit=cfg.data.limit,
                      train=folders.get("train") if needs_train(cfg) else None)
    try:
        run_stages(cfg.model_copy(update={"data": data, "output": str(staging)}), BUILD_STAGES, address)
    except (InputError, SettingsChanged) as e:  # its own advice (a new --out) does not apply here
        raise type(e)(f"{e}\nindex build: {staging} holds a build of other images or settings that was stopped; "
                      "delete it to build this one") from e
    name = build_from_run(str(staging), root, cfg)
    shutil.rmtree(staging, ignore_errors=True)
    return name


def detector_of(cards: dict[str, ModelCard], side: str) -> DetectorSpec | None:
    card = cards.get(DETECTOR_CARD.format(side=side))
    return DetectorSpec(card.weights, card.input_size) if card else None


def embedder_for(root: str, version: str, cfg: PipelineConfig, side: str, num_threads: int | None = None,
                 use_gpu: bool = False) -> ImageEmbedder:
    """The models and ``side``'s views of an index version, from the index's own cards (on the GPU
    with ``use_gpu`` when torch sees one)."""
    cards = read_cards(IndexDir(root), version)
    return ImageEmbedder(key_specs(cfg, None, cards), getattr(cfg.patches, side), detector_of(cards, side),
                         use_gpu=use_gpu, num_threads=num_threads)


def derive_keys(cfg: PipelineConfig, tables: list, pcas: dict, train: dict) -> dict[str, pa.Table]:
    """Per search key, the descriptors of one batch of images (``reduce`` applied when configured)."""
    by_key = dict(zip([k for _, _, k in cfg.model_keys()], tables))
    if not cfg.reduce.active:
        return by_key
    return {out: derive([by_key[k] for k in group], out, pcas.get(out), train.get(out), cfg.reduce)
            for group, out in cfg.reduce_groups()}


def remove_ids(root: str, ids: Sequence[str]) -> versions.Removal:
    idx = IndexDir(root)
    return versions.remove(idx, idx.require_current(), ids)


def compact(root: str) -> str:
    idx = IndexDir(root)
    _, cfg = index_config(root)
    return versions.compact(idx, idx.require_current(), cfg.search.index_spec(), cfg.search.shard_size)

