"""The model registry: cards on disk, one ``<name>.json`` per model, read, listed and written.

The registry folder is ``$COPYDET_REGISTRY``, else ``models/`` under the working directory.
Turning a name into a card that may need a model built (a checkpoint, a bare backbone) is
:mod:`core.models.resolve`'s job; this module imports no torch, so the command line and the
config loader stay quick to start.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from core.imageio import sha256_file
from core.models.cards import NAME_PATTERN, ModelCard, RegistryError, first_problem
from core.store import write_text

CARD_SUFFIX = ".json"


def default_registry_dir() -> Path:
    """``$COPYDET_REGISTRY`` if set, else ``./models``."""
    return Path(os.environ.get("COPYDET_REGISTRY") or Path.cwd() / "models")


def registry_path(registry: str | os.PathLike | None) -> Path:
    """The registry folder ``registry`` names, :func:`default_registry_dir` when it names none."""
    return Path(registry) if registry else default_registry_dir()


@lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (cached per path, size and mtime within a process)."""
    st = os.stat(path)
    return _file_hash(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def weights_hash(card: ModelCard) -> str | None:
    """The content hash of the card's weights (None: random init); refuses a file that changed
    since the card recorded its hash, so stale features are never reused under the same name."""
    if card.weights is None:
        return None
    if not Path(card.weights).is_file():
        raise RegistryError(f"model {card.name!r}: weights file {card.weights} does not exist")
    digest = file_hash(card.weights)
    if card.weights_sha256 and card.weights_sha256 != digest:
        raise RegistryError(f"model {card.name!r}: {card.weights} changed since the card was written (sha256 "
                            f"{digest[:12]}..., card says {card.weights_sha256[:12]}...); register the model again")
    return digest


def register(card: ModelCard, registry_dir: str | os.PathLike | None = None) -> Path:
    """Write ``card`` to ``<registry_dir>/<name>.json`` atomically (replacing an older card),
    with ``card.weights_sha256`` set to the content hash of its weights file. A weights file
    inside the registry folder is stored relative to it, so the folder can be copied or moved."""
    reg = registry_path(registry_dir)
    if card.weights and Path(card.weights).is_file():
        card.weights_sha256 = file_hash(card.weights)
    stored = card.model_copy(update={"weights": _stored_weights(card.weights, reg)})
    path = reg / f"{card.name}{CARD_SUFFIX}"
    write_text(path, stored.model_dump_json(indent=2) + "\n")
    return path


def _stored_weights(weights: str | None, reg: Path) -> str | None:
    """``weights`` as a card file holds it: relative to the registry folder ``reg`` when the
    file lives inside it, else absolute (so a stored relative path always means ``reg``)."""
    if weights is None:
        return None
    full, root = Path(weights).resolve(), reg.resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)


def _read_card(path: Path) -> ModelCard:
    """The card in file ``path``, its weights path made absolute (a relative one is relative
    to the card's folder); a bad file raises one line naming the file and its first problem."""
    try:
        card = ModelCard.model_validate_json(path.read_bytes())
    except OSError as e:
        raise RegistryError(f"{path}: cannot read model card: {e.strerror or e}") from e
    except ValidationError as e:
        raise RegistryError(f"{path}: invalid model card: {first_problem(e)}") from e
    if card.name != path.name[: -len(CARD_SUFFIX)]:
        raise RegistryError(f"{path}: card name {card.name!r} does not match the file name")
    if card.weights and not Path(card.weights).is_absolute():
        card.weights = str((path.parent / card.weights).resolve())
    return card


def _card_files(registry_dir: Path) -> list[Path]:
    # Checkpoint sidecars (<weights>.safetensors.json) may share the folder: they are not cards.
    files = registry_dir.glob(f"*{CARD_SUFFIX}")
    return sorted(p for p in files if not p.name.endswith(".safetensors.json"))


def list_cards(registry_dir: str | os.PathLike | None = None) -> list[ModelCard]:
    """Every card in the registry, sorted by name (an empty list if the folder does not exist);
    strict: the first invalid card file raises (see :func:`scan_cards` for a lenient listing)."""
    return [_read_card(p) for p in _card_files(registry_path(registry_dir))]


def scan_cards(registry_dir: str | os.PathLike | None = None) -> tuple[list[ModelCard], list[RegistryError]]:
    """The valid cards of the registry (sorted by name) and one error per invalid card file,
    so that one bad file neither hides the other cards nor goes unnoticed."""
    cards: list[ModelCard] = []
    problems: list[RegistryError] = []
    for path in _card_files(registry_path(registry_dir)):
        try:
            cards.append(_read_card(path))
        except RegistryError as e:
            problems.append(e)
    return cards, problems


def registered_names(registry_dir: Path) -> str:
    """The registered model names, comma-separated (``none`` for an empty registry)."""
    names = [p.name[: -len(CARD_SUFFIX)] for p in _card_files(registry_dir)]
    return ", ".join(names) or "none"


def load_card(name: str, registry_dir: str | os.PathLike | None = None) -> ModelCard:
    """The card registered as ``name``; the error lists the registered names."""
    reg = registry_path(registry_dir)
    path = reg / f"{name}{CARD_SUFFIX}"
    if not re.fullmatch(NAME_PATTERN, name) or not path.is_file():
        raise RegistryError(
            f"no model {name!r} in registry {reg}; registered: {registered_names(reg)}"
        )
    return _read_card(path)
