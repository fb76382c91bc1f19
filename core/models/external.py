"""Importing external descriptor models (ONNX, TorchScript) into the model registry.

An imported model is a file next to the cards (``<registry>/<name>.onnx`` or ``.pt``, both
ignored by git) plus a card of kind ``external`` whose ``build`` holds an
:class:`~core.models.cards.ExternalSpec`. Importing under a registered name replaces that card
(the command line asks for ``--force`` first, see :func:`refuse_registered`).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pydantic import ValidationError

from core.models.cards import (
    IDENTITY,
    IMAGENET,
    NAME_PATTERN,
    ExternalSpec,
    ModelCard,
    RegistryError,
    first_problem,
)
from core.models.registry import CARD_SUFFIX, file_hash, load_card, register, registry_path, scan_cards
from core.store import copy_file

log = logging.getLogger(__name__)

RUNTIME_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
SUFFIX_RUNTIME = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".jit": "torchscript"}


def runtime_for(path: Path, runtime: str | None) -> str:
    """``runtime`` if given, else the one the file suffix implies."""
    rt = runtime or SUFFIX_RUNTIME.get(path.suffix.lower())
    if rt not in RUNTIME_SUFFIX:
        raise RegistryError(f"{path}: cannot tell the runtime from the suffix {path.suffix!r}; "
                            f"give one of {sorted(RUNTIME_SUFFIX)}")
    return rt


def import_external(path: str | os.PathLike, name: str, *, registry: str | os.PathLike | None = None,
                    runtime: str | None = None, input_size: int, resize: str = "square",
                    mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                    copy: bool = True, **spec: object) -> ModelCard:
    """Register the model file ``path`` as ``name``: copy it next to the cards (``copy``),
    probe its output size with dummy patches, and write the card. A card already registered as
    ``name`` is replaced, and its model file removed when it lies in the registry folder and no
    card uses it any more.

    ``spec`` holds :class:`ExternalSpec` fields; mean/std default to identity for uint8
    input and to ImageNet's for float input.
    """
    from core.models.runtimes import probe_dim  # torch or onnxruntime: loaded to import, not to list

    src = Path(path)
    if not src.is_file():
        raise RegistryError(f"{src}: no such model file")
    rt = runtime_for(src, runtime)
    reg = registry_path(registry)
    default = IDENTITY if spec.get("dtype") == "uint8" else IMAGENET
    try:
        card = ModelCard(name=name, kind="external", arch=rt, weights=str(src.resolve()), input_size=input_size,
                         resize=resize, mean=mean or default[0], std=std or default[1],
                         build=ExternalSpec(**spec).model_dump(exclude_defaults=True))
    except ValidationError as e:
        raise RegistryError(f"{src}: invalid settings for model {name!r}: {first_problem(e)}") from e
    card.dim = probe_dim(card)  # before copying: a bad file never lands in the registry
    replaced = _weights_of(name, reg)
    dest = (reg / f"{name}{RUNTIME_SUFFIX[rt]}").resolve()
    if copy and dest != src.resolve():
        copy_file(src, dest)
        if file_hash(dest) != file_hash(src):  # another import of this name copied its file since
            raise RegistryError(f"{dest}: another import of {name!r} replaced it meanwhile; import one at a time")
        card.weights = str(dest)
    register(card, reg)
    if replaced is not None:
        _remove_if_unused(replaced, reg)
    return card


def refuse_registered(name: str, registry: str | os.PathLike | None = None) -> None:
    """Refuse to import over the card registered as ``name`` (the error names it): a silent
    replacement would change what every config naming ``name`` runs."""
    reg = registry_path(registry)
    path = reg / f"{name}{CARD_SUFFIX}"
    if not re.fullmatch(NAME_PATTERN, name) or not path.is_file():
        return  # an invalid name is the card's to report
    try:
        card = load_card(name, reg)
        what = f"{card.kind} {card.arch} model, weights {card.weights or 'none'}"
    except RegistryError as e:
        what = f"unreadable: {e}"
    raise RegistryError(f"model {name!r} is already registered ({path}: {what}); pass --force to replace it")


def _weights_of(name: str, reg: Path) -> Path | None:
    """The weights file of the readable card registered as ``name``, if any."""
    try:
        weights = load_card(name, reg).weights
    except RegistryError:
        return None
    return Path(weights) if weights else None


def _remove_if_unused(weights: Path, reg: Path) -> None:
    """Delete a replaced card's model file if it lies in the registry folder and no card uses it
    (files elsewhere are the user's own and are never touched; nor is one an unreadable card
    file might name)."""
    target = weights.resolve()
    if not target.is_relative_to(reg.resolve()) or not target.exists():
        return
    cards, problems = scan_cards(reg)
    if problems:
        log.warning(f"kept {target}: the replaced card used it and unreadable card files may too ({problems[0]})")
    elif all(c.weights is None or Path(c.weights).resolve() != target for c in cards):
        target.unlink()
