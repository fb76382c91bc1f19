"""Where each stage's files live inside a run folder (local path or URI)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.store import exists, join, list_shards, read_text, write_text

SETTINGS_FILE = "_settings.json"


class SettingsChanged(ValueError):
    """A stage would resume a folder whose shards were made with other settings."""


def pin_settings(folder: str, settings: dict[str, Any], what: str) -> None:
    """Record the settings that make ``folder``'s shards, or check them against the record.

    Resuming skips finished shards, so a run folder re-run with, say, another ``search.k``
    would silently keep the old shards; this refuses instead, naming what changed.
    """
    path = join(folder, SETTINGS_FILE)
    new = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if not exists(path):
        write_text(path, json.dumps(new, indent=2, sort_keys=True))
        return
    old = json.loads(read_text(path))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    if changed:
        raise SettingsChanged(f"{folder}: {what} shards were made with other settings ({'; '.join(changed)}); "
                              f"run into a new folder (--out) or delete {folder}")


@dataclass(frozen=True)
class RunDir:
    root: str

    @property
    def manifest(self) -> str:
        return join(self.root, "manifest.parquet")

    @property
    def errors(self) -> str:
        return join(self.root, "errors.parquet")

    @property
    def patches(self) -> str:
        return join(self.root, "patches.parquet")

    def features(self, key: str) -> str:
        return join(self.root, "features", key)

    def candidates(self, key: str) -> str:
        return join(self.root, "candidates", key)

    @property
    def fused(self) -> str:
        return join(self.root, "fused.parquet")

    @property
    def verify(self) -> str:
        return join(self.root, "verify.parquet")

    @property
    def predictions(self) -> str:
        return join(self.root, "predictions.csv")

    @property
    def copies(self) -> str:
        return join(self.root, "copies.csv")

    @property
    def metrics(self) -> str:
        return join(self.root, "metrics.json")

    @property
    def pr_curve(self) -> str:
        return join(self.root, "pr_curve.png")

    @property
    def timings(self) -> str:
        return join(self.root, "timings.json")

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")


def shard_names(folder: str, split: str | None = None) -> list[str]:
    """Basenames of the finished shards in ``folder`` (optionally of one split)."""
    names = [s.rsplit("/", 1)[-1] for s in list_shards(folder)]
    return [n for n in names if split is None or n.startswith(f"{split}-")]


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"
