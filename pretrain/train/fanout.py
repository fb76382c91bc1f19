"""Fan-out: one training config -> many independent runs, scheduled by Ray.

``plan_pretrain`` gives one BYOL run per backbone; ``plan_finetune`` one run per (set recipe,
backbone); ``plan_verifier`` the one learned-verifier run. :func:`run_all` launches them as
Ray tasks: with ``launcher: trainer`` each task fits its own ``TorchTrainer`` (the task takes
no CPU; the trainer's workers wait for theirs, so Ray runs as many at once as resources
allow), with ``launcher: inline`` each task runs the loop in its own process on
``cpus_per_worker`` CPUs. A run whose model card already exists is skipped (so a fan-out
resumes) unless another run folder registered the card (it fails), its run folder pins other
settings (it fails), or trained fewer epochs than the config asks (then it resumes), and a failed
run is reported while the others go on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from core.logs import last_line
from core.models.backbones import build_backbone
from core.models.cards import ModelCard, RegistryError
from core.models.registry import CARD_SUFFIX, load_card
from core.models.resolve import card_for_model, resolve_model
from pretrain.train.common import PIN, asked_epochs, pin_changes, pinned_settings, trained_epochs
from pretrain.train.registration import registered_from
from pretrain.train_config import RaySection, RunSpec, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one run."""

    name: str
    status: Literal["done", "skipped", "failed"]
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None  # what a user should know of a skipped run


def byol_name(cfg: TrainConfig, backbone: str) -> str:
    return f"{cfg.name}-{backbone}-byol"


def finetune_name(cfg: TrainConfig, backbone: str, recipe: str) -> str:
    return f"{cfg.name}-{backbone}-{recipe}"


def _spec(cfg: TrainConfig, **fields: Any) -> RunSpec:
    return RunSpec(
        registry=cfg.registry_dir(), run_dir=str(Path(cfg.output) / fields["name"]), seed=cfg.seed,
        data=cfg.data, model=cfg.model.for_backbone(fields["backbone"]), num_workers=cfg.ray.num_workers,
        use_gpu=cfg.ray.use_gpu, loader_workers=cfg.loader_workers, torch_threads=cfg.torch_threads,
        pretrain=cfg.pretrain, finetune=cfg.finetune, verifier=cfg.verifier, **fields,
    )


def planned_cards(cfg: TrainConfig) -> dict[str, ModelCard]:
    """Random-init cards of every model the config's runs will register (BYOL and fine-tuned),
    by registry name: same architecture, so sizes and speed can be planned before training."""
    cards = {}
    for b in _backbones(cfg):
        model = cfg.model.for_backbone(b)
        for name, pool in [(byol_name(cfg, b), model.pool),
                           *((finetune_name(cfg, b, r), cfg.finetune.pool or model.pool) for r in cfg.set_recipes())]:
            with torch.device("meta"):
                net = build_backbone(b, dim=model.dim, img_size=model.img_size, pool=pool, seed=cfg.seed)
            cards[name] = card_for_model(net, name=name)
    return cards


def _backbones(cfg: TrainConfig) -> list[str]:
    if not cfg.backbones:
        raise ValueError(f"training config {cfg.name!r}: backbones is empty; name the backbones to train")
    return cfg.backbones


def plan_pretrain(cfg: TrainConfig) -> list[RunSpec]:
    """One BYOL run per backbone, registered as ``<name>-<backbone>-byol``."""
    return [
        _spec(cfg, kind="byol", name=byol_name(cfg, b), backbone=b, recipe=cfg.pretrain.recipe)
        for b in _backbones(cfg)
    ]


def init_weights(cfg: TrainConfig, backbone: str) -> str | None:
    """The weights file fine-tuning of ``backbone`` starts from (None = random init)."""
    init = cfg.finetune.init
    if init == "random":
        return None
    if init == "byol":
        try:
            return load_card(byol_name(cfg, backbone), cfg.registry_dir()).weights
        except RegistryError as e:
            raise RegistryError(f"finetune.init=byol: {e} (run `copydet pretrain` first)") from e
    return resolve_model(init, cfg.registry_dir()).weights


def plan_finetune(cfg: TrainConfig) -> list[RunSpec]:
    """sets x backbones fine-tuning runs, registered as ``<name>-<backbone>-<recipe>``."""
    return [
        _spec(cfg, kind="finetune", name=finetune_name(cfg, b, r), backbone=b, recipe=r,
              init_weights=init_weights(cfg, b))
        for b in _backbones(cfg)
        for r in cfg.set_recipes()
    ]


def verifier_name(cfg: TrainConfig) -> str:
    return f"{cfg.name}-verifier"


def plan_verifier(cfg: TrainConfig) -> list[RunSpec]:
    """One verifier run over all set recipes, registered as ``<name>-verifier``; its token and
    miner models must resolve (refused here, naming the key, not inside Ray)."""
    for key in ("tokens", "miner"):
        try:
            resolve_model(getattr(cfg.verifier, key), cfg.registry_dir())
        except RegistryError as e:
            raise RegistryError(f"verifier.{key}: {e}") from e
    return [_spec(cfg, kind="verifier", name=verifier_name(cfg), backbone=cfg.verifier.tokens,
                  recipe="+".join(cfg.set_recipes()))]


def is_registered(spec: RunSpec) -> bool:
    return _card_file(spec).is_file()


def finished(spec: RunSpec) -> Outcome | None:
    """A registered run: skipped, or failed when its card came from another run folder (or cannot be
    tied to this one) or its run folder was trained with other settings (the config changed since:
    skipping it would leave the old model under the new config); None when the config asks for more
    epochs than its folder trained (it resumes, and registers again). A run whose own folder is gone
    is skipped with a note: its settings and epochs cannot be checked."""
    source, here = registered_from(spec), os.path.abspath(spec.run_dir)
    pinned = (Path(spec.run_dir) / PIN).is_file()
    if source != here and (source is not None or not pinned):  # a card without the record: its folder ties it
        return Outcome(spec.name, "failed", error=_not_from_here(spec, source))
    if not pinned:
        return Outcome(spec.name, "skipped", note=f"registered, but its run folder {spec.run_dir} is gone: settings "
                       "and epochs not checked (delete the card to train it again)")
    changed = pin_changes(spec, {"settings": pinned_settings(spec)})
    if changed:
        return Outcome(spec.name, "failed", error=f"registered from other settings ({'; '.join(changed[:5])}); "
                       f"delete {_card_file(spec)} and its run folder to train it again")
    trained, asked = trained_epochs(spec), asked_epochs(spec)
    if trained is not None and trained < asked:
        log.info("[fan-out] %s: registered after %d epoch(s), %d asked: resuming", spec.name, trained, asked)
        return None
    return Outcome(spec.name, "skipped")


def _card_file(spec: RunSpec) -> Path:
    return Path(spec.registry) / f"{spec.name}{CARD_SUFFIX}"


def _not_from_here(spec: RunSpec, source: str | None) -> str:
    """Why a card another run folder registered (``source``; None: unrecorded) is not this run's."""
    origin = (f"registered from run folder {source}, not from {spec.run_dir}" if source else
              f"records no run folder, and {spec.run_dir} is not there to tie it to this run")
    return (f"{_card_file(spec)}: {origin}, so it may hold other settings or epochs; set another `registry:` or "
            "`name:`, or delete the card to train it here")


def _task(spec: RunSpec, ray_cfg: RaySection) -> dict[str, Any]:
    from pretrain.train.launch import fit_local, fit_trainer

    if ray_cfg.launcher == "inline":
        return fit_local(spec)
    return fit_trainer(spec, cpus_per_worker=ray_cfg.cpus_per_worker, max_failures=ray_cfg.max_failures)


def _task_options(spec: RunSpec, ray_cfg: RaySection) -> dict[str, Any]:
    if ray_cfg.launcher == "trainer":  # the trainer's workers hold the resources
        return {"num_cpus": 0, "max_retries": 0}
    return {"num_cpus": ray_cfg.cpus_per_worker, "num_gpus": 1 if spec.use_gpu else 0,
            "max_retries": ray_cfg.max_failures, "retry_exceptions": False}



def run_all(specs: list[RunSpec], ray_cfg: RaySection) -> list[Outcome]:
    """Run every spec that is not registered yet as a Ray task (Ray must be initialised);
    outcomes in plan order. Exceptions of one run never stop the others."""
    import ray

    outcomes = {s.name: done for s in specs if is_registered(s) and (done := finished(s)) is not None}
    for name, o in outcomes.items():
        log.info("[fan-out] %s: %s (%s)", name, o.status, o.error or o.note or "registered already")
    todo = [s for s in specs if s.name not in outcomes]
    remote = ray.remote(_task)
    limit = ray_cfg.max_concurrent or len(todo) or 1
    running: dict[Any, RunSpec] = {}
    while todo or running:
        while todo and len(running) < limit:
            spec = todo.pop(0)
            running[remote.options(**_task_options(spec, ray_cfg)).remote(spec, ray_cfg)] = spec
        done, _ = ray.wait(list(running), num_returns=1)
        spec = running.pop(done[0])
        try:
            outcomes[spec.name] = Outcome(spec.name, "done", metrics=ray.get(done[0]))
        except Exception as e:  # a failed run is reported; the others go on
            outcomes[spec.name] = Outcome(spec.name, "failed", error=f"{type(e).__name__}: {last_line(e)}")
        log.info("[fan-out] %s: %s", spec.name, outcomes[spec.name].status)
    return [outcomes[s.name] for s in specs]
