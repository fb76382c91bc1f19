"""Strict YAML configs shared by every copydet config (pipeline, training, detector).

Read a mapping (``extends: base.yaml``, a path relative to the file, starts from that file's
mapping: nested mappings merge key by key, any other value, lists included, replaces), apply
``KEY=VALUE`` overrides (values parsed as YAML, dotted keys, list indices allowed), validate
with a pydantic model, and report every problem by its dotted key:
``configs/x.yaml: invalid config\\n  models.0.scales.1: Input should be a valid integer``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base of every config section: an unknown key, or a value of another type (``k: true`` or
    ``k: 2.5`` for an integer), is an error rather than a coercion. A number given for a text
    key (``output: 2024``, a folder) is taken as its text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_text(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        text = {name for name, f in cls.model_fields.items() if f.annotation in (str, str | None)}
        return {k: str(v) if k in text and isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in data.items()}


class ConfigError(ValueError):
    """A config file that is missing, unreadable or invalid; the message names file and key."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a number as in YAML 1.2 (YAML 1.1, which PyYAML
    follows, wants ``1.0e-3``); strict configs would refuse the string ``'1e-3'`` for a rate."""


EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")  # 1e-3, 2.5E4
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """A YAML document with :class:`ConfigLoader`: every config file and ``--set`` value is read so."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping, on top of the one it ``extends`` (if any)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file" + (f" (extended by {_seen[-1]})" if _seen else ""))
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be the path of a config file, got {base!r}")
    chain = (*_seen, path.resolve())
    if (path.parent / base).resolve() in chain:
        raise ConfigError(f"{path}: extends {base} makes a cycle: {' -> '.join(p.name for p in chain)} -> {base}")
    return merged(read_yaml(path.parent / base, chain), raw)


def merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key; anything else in ``top`` replaces."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _slot(node: Any, key: str, dotted: str) -> int | str:
    """The list index or mapping key that ``key`` names in ``node``, or a ConfigError naming ``dotted``."""
    if isinstance(node, dict):
        return key
    if not isinstance(node, list):
        raise ConfigError(f"--set {dotted}: cannot set {key!r} inside a {type(node).__name__} value")
    if not key.lstrip("-").isdigit():
        raise ConfigError(f"--set {dotted}: {key!r} is not a list index (the list has {len(node)} entries)")
    if not -len(node) <= int(key) < len(node):
        raise ConfigError(f"--set {dotted}: index {key} is out of range (the list has {len(node)} entries)")
    return int(key)


def set_key(tree: dict, dotted: str, value: Any) -> None:
    """``tree["a"]["b"][0]["c"] = value`` for ``dotted == "a.b.0.c"`` (creating mappings)."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for p in parents:
        slot = _slot(node, p, dotted)
        if isinstance(node, dict):
            node.setdefault(slot, {})
        node = node[slot]
    node[_slot(node, last, dotted)] = value


def text_override(key: str, value: str) -> str:
    """``KEY=VALUE`` that sets ``key`` to ``value`` as given: a path from a command-line option is
    text, not YAML (``runs/a #1`` would lose ``#1``, ``yes`` become true, ``[old] refs`` a list)."""
    return f"{key}={json.dumps(value)}"  # a JSON string is a YAML double-quoted scalar


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out.append((key.strip(), load_yaml(value)))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value of {key.strip()} is not valid YAML ({e.problem})") from None
    return out


def apply_overrides(raw: dict, items: list[str]) -> dict:
    for key, value in parse_overrides(list(items)):
        set_key(raw, key, value)
    return raw


def format_errors(source: str, err: ValidationError, what: str = "config") -> str:
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return "\n".join(lines)


def validate_as(model: type[M], raw: dict, source: str = "config", what: str = "config") -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(source, e, what)) from None


def load_as(model: type[M], path: str | os.PathLike, overrides: list[str] = (), what: str = "config") -> M:
    """Read ``path``, apply ``overrides`` and validate it as ``model``; errors name the file and,
    when there are any, the overrides (a typo in ``--set`` is not the file's)."""
    return validate_as(model, apply_overrides(read_yaml(path), list(overrides)), source_of(path, overrides), what)


def source_of(path: str | os.PathLike, overrides: Sequence[str] = ()) -> str:
    """What a config's errors name: the file, and the ``--set`` overrides applied to it."""
    return f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
