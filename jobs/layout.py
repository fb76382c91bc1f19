"""Where each stage's files live inside a run folder (local path or URI)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from core.contracts import shard_split
from core.lock import LOCK_NAME
from core.store import absolute, join, list_shards, read_shards, read_table


@dataclass(frozen=True)
class RunDir:
    """A run folder; a local one by its absolute path, since stages run as Ray tasks whose working
    folder is not the driver's (a relative ``--out`` on a cluster would land in each worker's own)."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", absolute(self.root))

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

    def pca(self, key: str) -> str:
        """The reduce stage's PCA of search key ``key``, fit on train/ once."""
        return join(self.root, "reduce", f"{key}.safetensors")

    def candidates(self, key: str) -> str:
        return join(self.root, "candidates", key)

    def decoys(self, key: str) -> str:
        """Train photos searched as references (``fuse.threshold: auto``)."""
        return join(self.root, "decoys", key)

    @property
    def fused(self) -> str:
        return join(self.root, "fused.parquet")

    @property
    def fused_decoys(self) -> str:
        return join(self.root, "fused_decoys.parquet")

    @property
    def threshold(self) -> str:
        """The estimated is-copy threshold of ``fuse.threshold: auto`` and its evidence."""
        return join(self.root, "threshold.json")

    @property
    def verify(self) -> str:
        return join(self.root, "verify.parquet")

    @property
    def predictions(self) -> str:
        return join(self.root, "predictions.csv")

    @property
    def scores(self) -> str:
        """Which stage's scores ``predictions.csv`` holds (fused or verified)."""
        return join(self.root, "predictions.json")

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
    def log(self) -> str:
        """The log lines of every command that held the folder, appended (``jobs.lock.locked``)."""
        return join(self.root, "copydet.log")

    @property
    def environment(self) -> str:
        """What each command that ran stages here was made with (``jobs.environment``)."""
        return join(self.root, "environment.json")

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def inputs(self) -> str:
        """The pinned input file list (``jobs.inputs``)."""
        return join(self.root, "inputs.parquet")

    @property
    def lock(self) -> str:
        return join(self.root, LOCK_NAME)


def shard_names(folder: str, split: str | None = None) -> list[str]:
    """Basenames of the finished shards in ``folder`` (optionally of one split)."""
    return [s.rsplit("/", 1)[-1] for s in list_shards(folder, f"{split}-" if split else "")]


def next_shard_number(shards: list[str]) -> int:
    """One past the highest number of ``<prefix>-NNNNN.parquet`` shards: a resumed stage never
    reuses a finished shard's number, even where a failed task left a gap below it."""
    return 1 + max((int(s.rsplit("-", 1)[-1].split(".")[0]) for s in shards), default=-1)


def paths_of(run: RunDir, split: str, ids: Iterable[str], required: bool = True) -> dict[str, str]:
    """image id -> file for ``ids`` of ``split`` (ids are unique within a split only): only those
    rows of the split's manifest shards are read (the manifest lists every image of the run,
    millions at DISC21 scale). An id it lacks is an error, or left out when not ``required``."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    shards = list_shards(run.manifest, f"{split}-")  # the manifest stage names its shards by split
    found: dict[str, str] = {}
    if len(wanted) and shards:
        rows = read_shards(shards, ["image_id", "path"], pc.field("image_id").isin(wanted))
        found = dict(zip(*(rows.column(c).to_pylist() for c in ("image_id", "path"))))
    if required and len(found) < len(wanted):
        missing = sorted(set(wanted.to_pylist()) - found.keys())
        raise ValueError(f"{run.manifest}: no {split} image with id(s) {missing[:5]}"
                         f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    return found


def split_tables(folder: str) -> dict[str, pa.Table]:
    """split -> that split's shards of ``folder`` as one table."""
    tables: dict[str, list[pa.Table]] = {}
    for name in shard_names(folder):
        tables.setdefault(shard_split(name), []).append(read_table(join(folder, name)))
    return {s: pa.concat_tables(t) for s, t in tables.items()}
