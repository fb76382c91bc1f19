"""Descriptor-model checkpoints: safetensors weights plus a JSON sidecar with the model config.

Files are read with safetensors or ``torch.load(weights_only=True)`` only, so loading a
checkpoint can never run code. ``load_weights`` also takes plain timm / torchvision state dicts
for the trunk (prefixes such as ``module.`` or ``backbone.`` are stripped, classifiers dropped).
``check_weights`` makes the same checks from the file's header alone (a meta-device model will do),
so a checkpoint that does not fit its model is refused before a run starts.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from core.store import write_bytes, write_text

SIDECAR_FORMAT = "copydet.descriptor/1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")  # training-checkpoint layouts
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning
_TRUNK_PREFIXES = ("backbone.", "trunk.")  # trunk of a backbone + head model; ours
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
_LISTED = 5  # keys quoted in an error message
V = TypeVar("V")  # a state dict's values: tensors, or shapes when only the header is read


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe or does not fit the model; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint: ``<path>.json`` (never clashes with a model card)."""
    return Path(f"{os.fspath(path)}.json")



def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s state dict to ``path`` (.safetensors) and its config to the sidecar.

    ``meta`` is free-form JSON (e.g. trained_on, loss, train_time_s, metrics); the registry
    copies the model-card fields from it. The sidecar is written last: it marks completion.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "checkpoints are saved as .safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, save(state))
    sidecar = {"format": SIDECAR_FORMAT, "config": model.config(), "meta": dict(meta or {})}
    write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of checkpoint ``path``: ``{"format", "config", "meta"}``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(side, "missing sidecar (save_checkpoint writes it with the weights)")
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(side, f"sidecar is not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(side, f"not a {SIDECAR_FORMAT} sidecar")
    if not isinstance(data.get("config"), dict):
        raise CheckpointError(side, "sidecar has no 'config' object")
    return data



def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file (``weights_only``), unwrapped from a
    ``{"state_dict": ...}``-style training checkpoint; errors name the file."""
    path = _checked_path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(os.fspath(path))
        except SafetensorError as e:
            raise CheckpointError(path, f"not a valid safetensors file ({e})") from e
    return _torch_state(path, "cpu")


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of checkpoint ``path``, without reading the tensors (the
    safetensors header; a torch file loads on the meta device): to check a file cheaply."""
    path = _checked_path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(path, f"not a valid safetensors file ({e})") from e
    return {k: tuple(v.shape) for k, v in _torch_state(path, "meta").items()}


def _checked_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, refused unless it is a file of a supported type."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            path,
            f"unsupported file type {path.suffix!r}; expected .safetensors or {TORCH_SUFFIXES}",
        )
    return path


def _torch_state(path: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of torch file ``path`` (``weights_only``) on ``device``, unwrapped."""
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\n|$)", str(e))
        why = reason.group(1) if reason else str(e).splitlines()[0]
        raise CheckpointError(
            path,
            f"refused by torch.load(weights_only=True): {why}. Only plain tensor state dicts "
            "are loaded; re-save the weights with safetensors or as a dict of tensors",
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(path, f"torch.load cannot read it ({e})") from e
    return _tensor_dict(_unwrap(obj), path)


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint such as ``{"epoch": 3, "state_dict": {...}}``."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
    if not obj:
        raise CheckpointError(path, "holds no tensors")
    return dict(obj)


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load ``path`` into ``model``; returns what was loaded, ``"model"`` or ``"trunk"``.

    A file whose keys are exactly the model's (ours, see :func:`save_checkpoint`) loads whole.
    Anything else is taken as a trunk state dict (timm/torchvision naming): wrapper prefixes
    (``module.``, ``model.``, ...) are stripped, only ``backbone.``/``trunk.`` keys are kept
    when present, and classifier keys (``fc.``, ``head.``, ``classifier.``) are dropped.
    Every trunk weight must be present with the right shape.
    """
    module, state, loaded = _match(model, read_state_dict(path))
    _check_fit(module, {k: tuple(v.shape) for k, v in state.items()}, path)
    module.load_state_dict(state, strict=False)
    return loaded


def check_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """:func:`load_weights` without loading: the same keys and shapes checks (same errors) on
    the file's header only, so ``model`` may be on the meta device. Cheap enough to refuse a
    checkpoint that does not fit its model before a run starts."""
    module, shapes, loaded = _match(model, read_shapes(path))
    _check_fit(module, shapes, path)
    return loaded


def _match(model: nn.Module, state: dict[str, V]) -> tuple[nn.Module, dict[str, V], str]:
    """The part of ``model`` that ``state`` loads into (``"model"`` whole or its ``"trunk"``),
    and the entries of ``state`` it takes (see :func:`load_weights`)."""
    state = _strip_wrappers(state)
    if state.keys() == model.state_dict().keys():
        return model, state, "model"
    return model.trunk, _trunk_part(state, model.trunk), "trunk"


def _strip_wrappers(state: dict[str, V]) -> dict[str, V]:
    """Remove prefixes that every key carries (DDP ``module.``, ``_orig_mod.``, ``model.``)."""
    def common(prefix: str) -> bool:
        return all(k.startswith(prefix) for k in state)

    while prefix := next((p for p in _WRAPPER_PREFIXES if common(p)), None):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _trunk_part(state: dict[str, V], trunk: nn.Module) -> dict[str, V]:
    prefix = next((p for p in _TRUNK_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is not None:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = trunk.state_dict().keys()
    return {k: v for k, v in state.items() if k in own or not k.startswith(_CLASSIFIER_PREFIXES)}


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _check_fit(module: nn.Module, state: dict[str, tuple[int, ...]], path: str | os.PathLike) -> None:
    """Refuse ``state`` (name -> shape) unless it fills every weight of ``module`` with the right
    shape and nothing else."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not state.keys() & own.keys():
        raise CheckpointError(
            path,
            f"no key matches the model (file: {_listed(sorted(state))}; "
            f"model: {_listed(sorted(own))})",
        )
    bad_shapes = [
        f"{k}: file {state[k]} vs model {own[k]}"
        for k in own
        if k in state and state[k] != own[k]
    ]
    if bad_shapes:
        raise CheckpointError(path, f"{len(bad_shapes)} shape mismatches: {_listed(bad_shapes)}")
    # BatchNorm step counters are absent from older checkpoints and unused in eval: optional.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(path, f"{len(missing)} model weights missing: {_listed(missing)}")
    if unexpected:
        raise CheckpointError(path, f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
