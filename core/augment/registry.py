"""Name -> entry registries filled by decorators (edits, ops)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def registrar(registry: dict[str, T], kind: str) -> Callable[[str], Callable[[T], T]]:
    """``register(name)``: a decorator that stores what it decorates in ``registry`` under ``name``.

    A second entry under one name is an error (``kind`` names the entries), so that two
    modules cannot silently replace each other's entry.
    """

    def register(name: str) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered")
            registry[name] = entry
            return entry

        return deco

    return register
