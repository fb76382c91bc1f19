"""Importing external descriptor models (ONNX, TorchScript) into the model registry.

An imported model is a file next to the cards (``<registry>/<name>.onnx`` or ``.pt``, both
ignored by git) plus a card of kind ``external`` whose ``build`` holds an
:class:`~core.models.cards.ExternalSpec`.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from core.models.cards import IDENTITY, IMAGENET, ExternalSpec, ModelCard, RegistryError
from core.models.registry import default_registry_dir, register
from core.models.runtimes import probe_dim
from core.store import copy_file

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
    probe its output size with one dummy patch, and write the card.

    ``spec`` holds :class:`ExternalSpec` fields; mean/std default to identity for uint8
    input and to ImageNet's for float input.
    """
    src = Path(path)
    if not src.is_file():
        raise RegistryError(f"{src}: no such model file")
    rt = runtime_for(src, runtime)
    reg = default_registry_dir() if registry is None else Path(registry)
    default = IDENTITY if spec.get("dtype") == "uint8" else IMAGENET
    try:
        card = ModelCard(name=name, kind="external", arch=rt, weights=str(src.resolve()), input_size=input_size,
                         resize=resize, mean=mean or default[0], std=std or default[1],
                         build=ExternalSpec(**spec).model_dump(exclude_defaults=True))
    except ValidationError as e:
        raise RegistryError(f"{src}: invalid settings for model {name!r}:\n{e}") from e
    card.dim = probe_dim(card)  # before copying: a bad file never lands in the registry
    dest = (reg / f"{name}{RUNTIME_SUFFIX[rt]}").resolve()
    if copy and dest != src.resolve():
        copy_file(src, dest)
        card.weights = str(dest)
    register(card, reg)
    return card


