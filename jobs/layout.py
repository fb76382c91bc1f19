"""Where each stage's files live inside a run folder (local path or URI)."""
from __future__ import annotations

from dataclasses import dataclass

from ensemble.store import join, list_shards


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
