"""Strict YAML configs shared by every copydet config (pipeline, training, detector).

Read a mapping (``extends: base.yaml``, a path relative to the file, starts from that file's
mapping: nested mappings merge key by key, any other value, lists included, replaces), apply
``KEY=VALUE`` overrides (values parsed as YAML, dotted keys, list indices allowed), validate
with a pydantic model, and report every problem by its dotted key:
``configs/x.yaml: invalid config\\n  models.0.scales.1: Input should be a valid integer``.
"""
from __future__ import annotations

import datetime
import difflib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base of every config section: an unknown key, or a value of another type (``k: true`` or
    ``k: 2.5`` for an integer), is an error rather than a coercion. A number given for a text
    key (``output: 2024``, a folder) is taken as its text. ``.inf`` and ``.nan`` are refused: no
    setting means them, and a NaN threshold compares false with every score."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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
    """PyYAML's safe loader, but numbers read as in YAML 1.2: ``1e-3`` is a number (YAML 1.1, which
    PyYAML follows, wants ``1.0e-3``; strict configs would refuse the string ``'1e-3'`` for a rate),
    ``010`` is ten (not octal eight) and ``12:30`` is text (not the base-60 number 750)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        text = str(self.construct_scalar(node)).replace("_", "")
        if ":" in text:
            return text
        if DECIMAL.fullmatch(text):
            return int(text, 10)
        return super().construct_yaml_int(node)


EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")  # 1e-3, 2.5E4
DECIMAL = re.compile(r"[-+]?[0-9]+")
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789"))
ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """A YAML document with :class:`ConfigLoader`: every config file and ``--set`` value is read so."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping, on top of the one it ``extends`` (if any)."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError(f"{path}: {what}" + (f" (extended by {_seen[-1]})" if _seen else ""))
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
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


OUT_PREFIX = 'output="'  # how with_output writes --out (text_override's JSON string)


def with_output(overrides: Sequence[str], out: str | None) -> list[str]:
    """``overrides`` and, when given, ``--out`` as the ``output`` key (its text as written)."""
    return [*overrides, *([text_override("output", out)] if out else [])]


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: no KEY before '='")
        try:
            out.append((key.strip(), load_yaml(value)))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value of {key.strip()} is not valid YAML ({e.problem})") from None
    return out


def apply_overrides(raw: dict, items: Sequence[str], model: type[BaseModel] | None = None) -> dict:
    """``raw`` with each ``KEY=VALUE`` set. For a text key of ``model``, a value YAML would read as
    something else is the text as typed: ``output=1.10`` is ``1.10``, not ``1.1``; ``name=no``, not false."""
    for item, (key, value) in zip(items, parse_overrides(list(items))):
        if model is not None and isinstance(value, (int, float, datetime.date)) and _is_text(model, key):
            value = item.split("=", 1)[1].strip()
        set_key(raw, key, value)
    return raw


def _section(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The config section at ``loc`` (keys and list indices, as in ``models.0``), if it is one."""
    node: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or str(part).lstrip("-").isdigit():
            continue
        field = node.model_fields.get(part) if node is not None else None
        if field is None:
            return None
        args = [field.annotation, *get_args(field.annotation)]  # X, Optional[X], list[X]
        node = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return node


def _is_text(model: type[BaseModel], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    section = _section(model, parents)
    field = section.model_fields.get(last) if section is not None else None
    return field is not None and field.annotation in (str, str | None)


def _problem(model: type[BaseModel], e: Any) -> str:
    """One error's line: unknown keys with the nearest known one, a validator's own message as it is."""
    *parent, last = e["loc"] or ("",)
    if e["type"] == "extra_forbidden":
        section = _section(model, parent)
        near = difflib.get_close_matches(str(last), list(section.model_fields) if section else [], n=1)
        return "unknown key" + (f" (did you mean {near[0]}?)" if near else "")
    return e["msg"].removeprefix("Value error, ")


def format_errors(source: str, err: ValidationError, model: type[BaseModel], what: str = "config") -> str:
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key + ': ' if key else ''}{_problem(model, e)}")
    return "\n".join(lines)


def validate_as(model: type[M], raw: dict, source: str = "config", what: str = "config") -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(source, e, model, what)) from None


def load_as(model: type[M], path: str | os.PathLike, overrides: list[str] = (), what: str = "config") -> M:
    """Read ``path``, apply ``overrides`` and validate it as ``model``; errors name the file and,
    when there are any, the overrides (a typo in ``--set`` is not the file's)."""
    return validate_as(model, apply_overrides(read_yaml(path), list(overrides), model), source_of(path, overrides),
                       what)


def source_of(path: str | os.PathLike, overrides: Sequence[str] = ()) -> str:
    """What a config's errors name: the file, and the ``--set`` overrides applied to it (``--out``
    as the user wrote it, not as the ``output`` override :func:`with_output` made of it)."""
    outs = [o for o in overrides if o.startswith(OUT_PREFIX)]
    sets = [o for o in overrides if not o.startswith(OUT_PREFIX)]
    given = ([f"--set {' '.join(sets)}"] if sets else []) + [f"--out {json.loads(o[len('output='):])}" for o in outs]
    return f"{path} with {' '.join(given)}" if given else str(path)
