"""A training run's model in the registry: its card, registration (card last: it marks a finished
run), and the record of which run folder registered it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.models.backbones import DescriptorModel
from core.models.cards import ModelCard, RegistryError
from core.models.checkpoint import save_checkpoint, sidecar_path
from core.models.registry import CARD_SUFFIX, load_card, register
from core.models.resolve import card_for_model
from core.store import copy_file, write_text
from pretrain.train_config import RunSpec


def run_card(spec: RunSpec, model: DescriptorModel, **fields: Any) -> ModelCard:
    """The model card of this run's model (weights filled in at registration)."""
    return card_for_model(model, name=spec.name, trained_on=spec.recipe, **fields)


def unregister(spec: RunSpec) -> None:
    """Delete the run's card before its weights are replaced (a run registered again after more
    epochs): a process killed in between leaves the run unregistered, to resume, not a card whose
    hash the new weights no longer match."""
    (Path(spec.registry) / f"{spec.name}{CARD_SUFFIX}").unlink(missing_ok=True)


def register_model(spec: RunSpec, model: DescriptorModel, card: ModelCard, weights: Path | None = None) -> Path:
    """Copy the weights (``weights`` or ``model``'s own) next to the card in the registry and
    write the card; returns the card path. The card is written last: it marks a finished run."""
    registry = Path(spec.registry)
    target = registry / f"{spec.name}.safetensors"
    unregister(spec)
    if weights is None:
        save_checkpoint(model, target, meta=card.model_dump(include={"trained_on", "loss", "metrics"}))
    else:
        copy_file(weights, target)
        copy_file(sidecar_path(weights), sidecar_path(target))
    record_source(spec, target)
    return register(card.model_copy(update={"weights": str(target.resolve())}), registry)


SOURCE = "run_dir"  # sidecar meta key of registered weights: the run folder that registered them
VERIFIER_SIDECAR = "copydet.verifier-meta/1"  # a registered verifier's sidecar: meta only


def record_source(spec: RunSpec, weights: Path) -> None:
    """Write the run folder into the sidecar meta of the registered ``weights`` (a verifier's gets
    a meta-only sidecar): a fan-out can then tell a card registered from its own run folder,
    deleted since, from one another output folder registered (:func:`registered_from`)."""
    side = sidecar_path(weights)
    sidecar = json.loads(side.read_text()) if side.is_file() else {"format": VERIFIER_SIDECAR}
    sidecar.setdefault("meta", {})[SOURCE] = os.path.abspath(spec.run_dir)
    write_text(side, json.dumps(sidecar, indent=2) + "\n")


def registered_from(spec: RunSpec) -> str | None:
    """The run folder that registered the card of ``spec.name``, as its weights' sidecar records it
    (None: no record, e.g. a card registered before runs recorded it, or imported)."""
    try:
        weights = load_card(spec.name, spec.registry).weights
        meta = json.loads(sidecar_path(weights).read_text()).get("meta") if weights else None
    except (RegistryError, OSError, ValueError, AttributeError):  # no card, no sidecar, not JSON, not an object
        return None
    return meta.get(SOURCE) if isinstance(meta, dict) else None
