"""Model names resolved to cards and built into models.

A name resolves, in order, to a card in the registry (:mod:`core.models.registry`), a
checkpoint file with its sidecar (:mod:`core.models.checkpoint`), or a bare backbone name
(a random-init card). Cards of checkpoints and backbones are sized on torch's meta device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core.models.backbones import DescriptorModel, build_backbone, list_backbones
from core.models.cards import NAME_PATTERN, ModelCard, RegistryError, first_problem
from core.models.checkpoint import CheckpointError, check_weights, load_weights, read_sidecar, sidecar_path
from core.models.registry import CARD_SUFFIX, load_card, registered_names, registry_path

# Fields a checkpoint's sidecar "meta" may fill in on the card made from it.
_META_FIELDS = ("trained_on", "loss", "source_checkpoint", "train_time_s", "metrics", "resize")


def card_for_model(
    model: DescriptorModel, *, name: str, weights: str | None = None, **fields: Any
) -> ModelCard:
    """A backbone card describing ``model``; ``fields`` set the provenance fields."""
    return ModelCard(
        name=name, kind="backbone", arch=model.name, weights=weights, input_size=model.img_size,
        mean=model.mean, std=model.std, dim=model.dim, build=model.config(), **fields,
    )


def build_from_sidecar(path: str | os.PathLike) -> DescriptorModel:
    """The (random-init) architecture that the sidecar of checkpoint ``path`` describes."""
    config = read_sidecar(path)["config"]
    try:
        return build_backbone(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(sidecar_path(path), f"cannot rebuild the model ({e})") from e


def load_checkpoint(path: str | os.PathLike) -> DescriptorModel:
    """The model a ``save_checkpoint`` file describes, with its weights."""
    if not Path(path).is_file():
        raise CheckpointError(path, "no such file")
    model = build_from_sidecar(path)
    load_weights(model, path)
    return model


def card_from_checkpoint(path: str | os.PathLike) -> ModelCard:
    """A card for a checkpoint written by ``save_checkpoint``, named after the file stem; its
    tensors' names and shapes must fit the sidecar's model (read from the file's header)."""
    path = Path(path).resolve()
    with torch.device("meta"):  # architecture only: no weights allocated
        model = build_from_sidecar(path)
    check_weights(model, path)
    meta = read_sidecar(path).get("meta") or {}
    fields = {k: meta[k] for k in _META_FIELDS if k in meta}
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.removesuffix(".safetensors"))
    try:
        return card_for_model(model, name=name, weights=str(path), **fields)
    except ValidationError as e:
        raise RegistryError(f"{sidecar_path(path)}: sidecar gives an invalid card: {first_problem(e)}") from e


def weights_fit(weights: str | os.PathLike, build: Mapping[str, Any]) -> str:
    """What of ``build_backbone(**build)`` checkpoint ``weights`` loads (``"model"``/``"trunk"``),
    checked from the file's header on a meta-device model: the ``CheckpointError`` that loading
    would raise, raised before a run starts and at the cost of reading a header."""
    with torch.device("meta"):
        model = build_backbone(**build)
    return check_weights(model, weights)


def check_card_weights(card: ModelCard) -> None:
    """Refuse a backbone card whose weights file does not fit its architecture (see
    :func:`weights_fit`), which :func:`build_model` would only find when a worker loads it."""
    if card.kind == "backbone" and card.weights is not None:
        weights_fit(card.weights, card.build)


def backbone_card(name: str, *, dim: int | None = None) -> ModelCard:
    """A random-init card for backbone ``name`` (see ``build_backbone``'s seed)."""
    with torch.device("meta"):
        model = build_backbone(name, dim=dim)
    return card_for_model(model, name=name)


def repooled(card: ModelCard, pool: str) -> ModelCard:
    """``card`` read out with another pooling of the same trunk (e.g. ``gem_grid2``).

    Trained models qualify only without a projection: it was fit to the old pooling's output.
    """
    if card.kind != "backbone":
        raise RegistryError(f"model {card.name!r} is a {card.kind}: pool applies to backbone models only")
    if pool == card.build.get("pool"):
        return card
    if card.weights is not None and card.build.get("dim") is not None:
        raise RegistryError(
            f"model {card.name!r} projects its pooled features to {card.dim} dims, which fit its own "
            f"pooling {card.build.get('pool')!r} only; pool={pool!r} needs a model trained with dim: null")
    build = {**card.build, "pool": pool}
    with torch.device("meta"):
        model = build_backbone(**build)
    return card.model_copy(update={"build": build, "dim": model.dim})


def resolve_model(
    name_or_path: str | os.PathLike,
    registry_dir: str | os.PathLike | None = None,
    *,
    dim: int | None = None,
    pool: str | None = None,
) -> ModelCard:
    """Registry name, then checkpoint path (with sidecar), then backbone name -> card.

    ``dim`` sets the projection of a random-init backbone; for a trained model it must be
    None or equal the model's own size. ``pool`` reads the model out with another pooling
    (see :func:`repooled`).
    """
    card = _resolve(name_or_path, registry_dir, dim=dim)
    return card if pool is None else repooled(card, pool)


def _resolve(name_or_path: str | os.PathLike, registry_dir: str | os.PathLike | None, *,
             dim: int | None) -> ModelCard:
    reg = registry_path(registry_dir)
    key = os.fspath(name_or_path)
    if re.fullmatch(NAME_PATTERN, key) and (reg / f"{key}{CARD_SUFFIX}").is_file():
        card = load_card(key, reg)
    elif Path(key).is_file():
        card = card_from_checkpoint(key)
    elif key in list_backbones():
        return backbone_card(key, dim=dim)
    else:
        raise RegistryError(
            f"cannot resolve model {key!r}: not in registry {reg} (registered: "
            f"{registered_names(reg)}), not a checkpoint file, and not a backbone "
            f"({', '.join(list_backbones())})"
        )
    if dim is not None and dim != card.dim:
        raise RegistryError(
            f"model {key!r} has dim {card.dim}; dim={dim} only sets random-init backbones"
        )
    return card


def build_model(card: ModelCard) -> DescriptorModel:
    """The descriptor model of a backbone card, with its weights loaded when it has any."""
    if card.kind != "backbone":
        raise RegistryError(f"model {card.name!r} is a {card.kind}, not a descriptor backbone")
    model = build_backbone(**card.build, checkpoint=card.weights)
    if model.dim != card.dim:
        raise RegistryError(
            f"model {card.name!r}: card says dim {card.dim}, the built model gives {model.dim}"
        )
    return model
