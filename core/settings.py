"""A folder's record of the settings its files were made with (``_settings.json``): resuming
skips finished files, so a folder re-run with other settings is refused, naming what changed."""
from __future__ import annotations

import json
from typing import Any

from core.store import exists, join, read_text, write_text

SETTINGS_FILE = "_settings.json"


class SettingsChanged(ValueError):
    """A stage would resume a folder whose shards were made with other settings."""


def settings_changes(folder: str, settings: dict[str, Any]) -> list[str] | None:
    """``key: old -> new`` for every setting that differs from ``folder``'s record (None: no record)."""
    old = read_settings(folder)
    return None if old is None else changes(old, as_recorded(settings))


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every (dotted) key whose value differs between two recorded settings."""
    old, new = flat(old), flat(new)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def as_recorded(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as ``_settings.json`` gives them back (JSON types; paths and enums as text)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys, so a change names the one key (``query.flip``) and not the section."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


NEW_FOLDER = "run into a new folder (--out)"


def check_settings(folder: str, settings: dict[str, Any], what: str, advice: str = NEW_FOLDER,
                   made: str = "shards") -> bool:
    """Refuse ``settings`` if ``folder`` records other ones (see :func:`pin_settings`), the error
    naming what was ``made`` and ending in ``advice``; writes nothing. Returns whether there is a record."""
    changed = settings_changes(folder, settings)
    if changed:
        raise SettingsChanged(f"{folder}: {what} {made} were made with other settings ({'; '.join(changed)}); "
                              f"{advice}, or delete {folder}")
    return changed is not None


def pin_settings(folder: str, settings: dict[str, Any], what: str, advice: str = NEW_FOLDER,
                 made: str = "shards") -> None:
    """Record the settings that make ``folder``'s shards, or check them against the record.

    Resuming skips finished shards, so a run folder re-run with, say, another ``search.k``
    would silently keep the old shards; this refuses instead, naming what changed.
    """
    if not check_settings(folder, settings, what, advice, made):
        write_text(join(folder, SETTINGS_FILE), json.dumps(settings, indent=2, sort_keys=True, default=str))


def read_settings(folder: str) -> dict[str, Any] | None:
    """The settings ``folder``'s shards were made with (None: not recorded yet)."""
    path = join(folder, SETTINGS_FILE)
    return json.loads(read_text(path)) if exists(path) else None
