"""Everything a run can be refused for, checked before the first stage and before config.yaml is written.

For the stages asked for: every model and the detectors resolve (a missing one is named with
the command that makes it); each stage folder's recorded settings match the config
(``core.settings.check_settings``); the image folders exist and hold images, no id is given by two
files, the files match the run folder's pinned list (``jobs.inputs``); the ground truth
names only images of the inputs; and later stages need a manifest. Nothing is written but the
pinned input list of a new run.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from core.models.cards import RegistryError
from core.models.checkpoint import CheckpointError
from core.models.resolve import check_card_weights
from core.models.sscd import SSCD_MEMBERS
from core.settings import check_settings
from core.store import join
from core.yamlconf import ConfigError, read_yaml
from jobs.completeness import manifest_shards
from jobs.config import PipelineConfig
from jobs.inputs import InputError, check_ground_truth, pin_inputs, recheck_inputs, split_folders
from jobs.layout import RunDir
from jobs.stages.extract import KeySpec, key_settings, key_specs
from jobs.stages.manifest import manifest_settings
from jobs.stages.patch import patch_settings, resolve_detector, side_views
from jobs.stages.reduce import reduce_settings
from jobs.stages.search import decoy_settings, search_settings
from jobs.stages.verify import verify_settings
from patchers.plan import DetectorSpec
from pretrain.train.fanout import byol_name, finetune_name, verifier_name
from pretrain.train_config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
IMAGE_STAGES = {"manifest", "patch", "extract", "verify"}  # stages that open the image files
BOTH_SIDES = {"search", "fuse"}  # stages that need queries and references
T = TypeVar("T")
Folder = tuple[str, str, dict, str]  # (stage, folder, the settings it records, what to call it)


@lru_cache(maxsize=1)
def producers() -> dict[str, str]:
    """Registry name -> the command that makes it, for the models this repository knows how to make."""
    out = {name: "copydet models fetch-sscd" for name in SSCD_MEMBERS}
    for path in sorted(CONFIGS.glob("train/*.yaml")):
        try:
            train = load_train_config(path)
        except ConfigError:
            continue
        rel = path.relative_to(CONFIGS.parent)
        for backbone in train.backbones:
            out.setdefault(byol_name(train, backbone), f"copydet pretrain {rel}")
            for recipe in train.set_recipes():
                out.setdefault(finetune_name(train, backbone, recipe), f"copydet finetune {rel}")
        out.setdefault(verifier_name(train), f"copydet train-verifier {rel}")
    for path in sorted(CONFIGS.glob("detector/*.yaml")):
        name = read_yaml(path).get("name")
        if isinstance(name, str):
            out.setdefault(name, f"copydet detector train {path.relative_to(CONFIGS.parent)}")
    return out


def how_to_get(name: str, detector: bool = False) -> str:
    """What makes registry name ``name``: a known producer's command, else how such a model is registered
    (a detector only by `copydet detector train`: an imported ONNX embedding model is not one)."""
    command = producers().get(name)
    if command:
        return f"to make {name!r}, run `{command}`"
    if detector:
        return (f"make the detector {name!r} with `copydet detector train CONFIG` (configs/detector/cpu.yaml "
                "names it copy-detector-cpu; set `name:` in a copy for another name), which registers it")
    return (f"register {name!r} (`copydet models import-onnx PATH --name {name} ...`, or train it), or give a "
            "backbone name or a checkpoint path")


def resolved(what: str, name: str | None, fn: Callable[[], T]) -> T:
    """``fn()``, or its RegistryError on one line with what to run to get ``name`` (a detector when
    ``what`` is a ``patches.SIDE.detector`` key); a CheckpointError (the file is there but unusable:
    nothing to make) on one line as it is."""
    try:
        return fn()
    except RegistryError as e:
        hint = how_to_get(name or "", detector=what.endswith(".detector"))
        raise RegistryError(f"{what}: {' '.join(str(e).split())}; {hint}") from None
    except CheckpointError as e:
        raise RegistryError(f"{what}: {' '.join(str(e).split())}") from None


def checked_keys(one: PipelineConfig, run: RunDir) -> list[KeySpec]:
    """The keys of a one-model config, its weights checked against its architecture (the file's
    header only), so a checkpoint that does not fit fails here and not in an extract worker."""
    keys = key_specs(one, run)
    check_card_weights(keys[0].card)  # every scale of the one model shares its card
    return keys


def resolved_each(items: Sequence[tuple[str, str | None, Callable[[], T]]]) -> list[T]:
    """:func:`resolved` for each ``(what, name, fn)``; every name that does not resolve is named
    in one line, so a fresh clone learns at once everything it has to make."""
    out, errors = [], []
    for what, name, fn in items:
        try:
            out.append(resolved(what, name, fn))
        except RegistryError as e:
            errors.append(str(e))
    if errors:
        raise RegistryError("; ".join(errors))
    return out


def detector_checks(cfg: PipelineConfig) -> list[tuple[str, str | None, Callable[[], DetectorSpec | None]]]:
    """``(what, name, resolve)`` of each side's detector, in :func:`side_views` order, for :func:`resolved_each`."""
    return [(f"patches.{side}.detector", views.detector,
             lambda views=views: resolve_detector(views.detector, cfg.registry))
            for side, views in side_views(cfg).items()]


def stage_folders(cfg: PipelineConfig, run: RunDir, stages: Sequence[str]) -> Iterator[Folder]:
    """``(stage, folder, settings, what)`` of each folder ``stages`` write, with the settings it must
    record; resolves the models and detectors the stages use (one error names every one missing)."""
    if "manifest" in stages:
        yield "manifest", run.manifest, manifest_settings(cfg), "manifest"
    # every detector and model of the run first, so one line names all that a fresh clone lacks
    sides = detector_checks(cfg) if "patch" in stages else []
    members = [cfg.model_copy(update={"models": [entry]}) for entry in cfg.models] if "extract" in stages else []
    found = resolved_each([
        *sides,
        *((f"models.{i}.name", one.models[0].name, lambda one=one: checked_keys(one, run))
          for i, one in enumerate(members))])
    if "patch" in stages:
        yield "patch", run.patches, patch_settings(cfg, dict(zip(side_views(cfg), found[:len(sides)]))), "patch"
    if "extract" in stages:
        keys = [key for member in found[len(sides):] for key in member]
        for (entry, _, _), key in zip(cfg.model_keys(), keys):
            yield "extract", key.folder, key_settings(cfg, entry, key), "extract"
    if "reduce" in stages and cfg.reduce.active:
        for _, out_key in cfg.reduce_groups():
            yield "reduce", run.features(out_key), reduce_settings(cfg), f"reduce {out_key}"
    if "search" in stages:
        for key in cfg.search_keys():
            yield "search", run.candidates(key), search_settings(cfg), "search"
            if cfg.decoys():
                yield "search", run.decoys(key), decoy_settings(cfg), "search (decoys)"
    if "verify" in stages and cfg.verify.enabled:
        scorers = resolved("verify.learned.model", cfg.verify.learned.model, lambda: verify_settings(cfg))
        for name, settings in scorers.items():
            yield "verify", join(run.verify, name), settings, f"verify ({name})"


def check_stage_settings(cfg: PipelineConfig, run: RunDir, stages: Sequence[str]) -> None:
    """Resolve the models and detectors the stages use and refuse settings their folders did not record."""
    for _, folder, settings, what in stage_folders(cfg, run, stages):
        check_settings(folder, settings, what)


def check_inputs(cfg: PipelineConfig, run: RunDir, stages: Sequence[str]) -> None:
    """Pin the inputs of a new run folder or refuse changed ones; validate the ground truth."""
    if "manifest" in stages:
        both = BOTH_SIDES & set(stages)
        if both and cfg.decoys() and "train" not in cfg.data.folders():
            raise InputError("fuse.threshold: auto estimates the threshold from train/ photos (the decoys), but "
                             "the config has no train folder; set data.train (--train) or a number for fuse.threshold")
        folders = split_folders(cfg.data, ("query", "reference") if both else ())
        inputs = pin_inputs(run, folders)
        gt = cfg.data.ground_truth_path()
        if gt and not check_ground_truth(gt, inputs, cfg.data.limit):  # evaluate would fail after every stage
            raise InputError(f"{gt}: no (query, reference) pair to evaluate"
                             + (f" among the images data.limit {cfg.data.limit} keeps; raise it" if cfg.data.limit
                                else ""))
    elif IMAGE_STAGES & set(stages):
        recheck_inputs(run)


def preflight(cfg: PipelineConfig, stages: Sequence[str]) -> None:
    """Every early check for running ``stages`` with ``cfg`` (see the module docstring)."""
    run = RunDir(cfg.output)
    if "manifest" not in stages:  # every other stage starts from the manifest's shards
        manifest_shards(run)
    check_stage_settings(cfg, run, stages)
    check_inputs(cfg, run, stages)
