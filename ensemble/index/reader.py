"""Reading one index version: its shards as searchable faiss indexes, minus tombstones.

Removed references are filtered inside faiss (an id selector per shard), so a removed image
is never returned and the live top-k is what an index built without it would return. With
``whole_only`` a search sees whole-image rows (patch 0) only: the second index of the D2LV
pair rule (``search.pairs: d2lv``) without a second copy of the vectors.
"""
from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.contracts import WHOLE_PATCH
from core.knn import Hits, IndexSpec, build_index, index_kind, merge_topk
from core.models.cards import ModelCard
from core.store import embeddings_from_arrow, read_table
from ensemble.index.layout import IndexDir, IndexFolderError
from ensemble.index.versions import Q_CURVE, is_inside, live_images, read_manifest, removed_table
from ensemble.reduce import Pca, load_pca
from ensemble.sharded import ShardIndex

NOTHING = "nothing"  # a shard with no row a search may return


def search_params(index: faiss.Index, rows: np.ndarray) -> faiss.SearchParameters | str | None:
    """Search parameters that let ``index`` return only the rows where ``rows`` is True
    (None: every row; :data:`NOTHING`: no row)."""
    if rows.all():
        return None
    if not rows.any():
        return NOTHING
    bitmap = np.packbits(rows, bitorder="little")  # a bit per row: IDSelectorBatch would hash every live id
    params = selecting(index, faiss.IDSelectorBitmap(len(rows), faiss.swig_ptr(bitmap)))
    params.keep = (params.keep, bitmap)  # the bits must live as long as the parameters
    return params


def selecting(index: faiss.Index, sel: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters of ``index``'s kind that pass ``sel`` on. A re-ranked index takes the
    selector in its base's parameters: the base picks the hits that are re-ranked."""
    if isinstance(index, faiss.IndexRefine):
        base = selecting(faiss.downcast_index(index.base_index), sel)
        params = faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=base)
        params.keep = base
        return params
    if faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF(sel=sel, nprobe=faiss.extract_index_ivf(index).nprobe)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=index.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=sel)
    params.keep = sel  # the selector must live as long as the parameters
    return params


def file_id(path: Path) -> tuple[int, int, int, int]:
    """A file's identity across versions: hard links share it, a rewritten file (or a reused
    inode number) does not."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class KeyIndex:
    """One search key: reference shards with their live / whole-image selectors, and the train
    background of score normalisation. With ``reuse`` (the same key of the version served before),
    the shards and background that the two versions share by hard link are taken over, not read
    again: a service swapping versions after an add loads only what the add wrote."""

    def __init__(self, folder: Path, meta: dict, removed: set[str], spec: IndexSpec, neighbours: int,
                 reuse: KeyIndex | None = None) -> None:
        self.dim, self.kind = int(meta["dim"]), meta["kind"]
        self.loaded: dict[tuple, tuple[ShardIndex, pa.ChunkedArray]] = {}  # file id -> shard, its image ids
        self.shards: list[tuple[ShardIndex, object, object]] = []
        gone = pa.array(sorted(removed), pa.string())
        for s in meta["shards"]:
            path = folder / f"{s['name']}.faiss"
            fid = file_id(path)
            if reuse is not None and fid in reuse.loaded:
                self.loaded[fid] = reuse.loaded[fid]
            else:
                ids = read_table(folder / f"{s['name']}.parquet", columns=["image_id", "patch_id"])
                self.loaded[fid] = ShardIndex.restore(ids, faiss.read_index(str(path)), self.kind), ids["image_id"]
            shard, image_ids = self.loaded[fid]
            live = ~pc.is_in(image_ids, value_set=gone).to_numpy()  # np.isin: rows x removed
            self.shards.append((shard, search_params(shard.index, live),
                                search_params(shard.index, live & (shard.patch_ids == WHOLE_PATCH))))
        self.train_file = folder / "train.parquet"
        self.background = (file_id(self.train_file), spec, neighbours) if meta.get("train_rows") else None
        if reuse is not None and self.background is not None and reuse.background == self.background:
            self.train: ShardIndex | None = reuse.train
            if "train_x" in vars(reuse):
                self.train_x = reuse.train_x
        else:
            self.train = self._read_background(spec, neighbours) if self.background else None

    def _read_background(self, spec: IndexSpec, neighbours: int) -> ShardIndex:
        t = read_table(self.train_file, columns=["image_id", "patch_id", "embedding"])
        x = embeddings_from_arrow(t.column("embedding"))
        kind = index_kind(len(x), spec)
        return ShardIndex.restore(t.select(["image_id", "patch_id"]), build_index(x, kind, spec, neighbours), kind)

    @cached_property
    def train_x(self) -> np.ndarray:
        """The train descriptors themselves, read when first asked for: descriptor stretching
        needs them (``reduce.stretch``), and holding them beside the train index doubles its memory."""
        return embeddings_from_arrow(read_table(self.train_file, columns=["embedding"]).column("embedding"))

    @property
    def rows(self) -> int:
        return sum(s.rows for s, _, _ in self.shards)

    def search(self, x: np.ndarray, k: int, whole_only: bool = False) -> Hits:
        """Top-``k`` live rows (whole-image rows only with ``whole_only``) for each query row."""
        parts = [shard.search(x, k, p) for shard, live, whole in self.shards
                 for p in [whole if whole_only else live] if p is not NOTHING]
        if not parts:
            n = len(x)
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), object), np.zeros((n, 0), np.int32)
        return merge_topk(parts, k)

    def bias(self, x: np.ndarray, n: int) -> np.ndarray:
        """Mean of the ``n`` best similarities of each row to the train background."""
        if self.train is None:
            raise IndexFolderError("this index has no train background (score normalisation was off at build)")
        if n > self.train.rows:
            raise ValueError(f"search.normalize.neighbours={n} exceeds the {self.train.rows} train descriptors")
        return self.train.search(x, n)[0].mean(axis=1, dtype=np.float64).astype(np.float32)


class IdPaths:
    """Image id -> file path of a version's live references: two Arrow string columns sorted by
    id, looked up by binary search (~15 us). Each service replica holds one per version it
    loads: at 1M references 56 MiB, where a dict of Python strings took 171 MiB (``bench/id_paths.py``)."""

    def __init__(self, images: pa.Table) -> None:
        table = images.select(["image_id", "path"]).sort_by("image_id")
        self._ids, self._paths = (table.column(c).combine_chunks() for c in ("image_id", "path"))

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, image_id: str, default: str | None = None) -> str | None:
        """The path of ``image_id``, or ``default`` when it is not a live reference."""
        i = bisect_left(self._ids, image_id, key=lambda s: s.as_py())  # Arrow sorts UTF-8 bytes: code point order
        return self._paths[i].as_py() if i < len(self._ids) and self._ids[i].as_py() == image_id else default

    def __getitem__(self, image_id: str) -> str:
        path = self.get(image_id)
        if path is None:
            raise KeyError(image_id)
        return path

    def __iter__(self) -> Iterator[str]:
        """The live ids, in order."""
        return (s.as_py() for s in self._ids)


class IndexVersion:
    """A published version, loaded: per key its :class:`KeyIndex`, the live id map, the
    config text, the model cards (weights in the index's blobs/) and any PCA. ``reuse``: the
    version loaded before, whose shared shards are taken over (:class:`KeyIndex`)."""

    def __init__(self, root: str | os.PathLike, version: str | None, spec: IndexSpec, neighbours: int = 1,
                 reuse: IndexVersion | None = None) -> None:
        idx = IndexDir(root)
        self.version = version or idx.require_current()
        folder = idx.path(self.version)
        self.meta = read_manifest(folder)
        removed = set(removed_table(folder).column("image_id").to_pylist())
        before = reuse.keys if reuse is not None else {}
        self.keys = {key: KeyIndex(folder / "keys" / key, m, removed, spec, neighbours, before.get(key))
                     for key, m in self.meta["keys"].items()}
        images = live_images(folder, self.meta)
        self.paths = IdPaths(images)
        self.pca: dict[str, Pca] = {key: load_pca(folder / m["pca"]) for key, m in self.meta["keys"].items()
                                    if m.get("pca")}
        self.cards = read_cards(idx, self.version)
        curve = folder / Q_CURVE  # [(lowest score, q) per level], best first (ensemble.decoys.q_curve)
        self.q_curve: list[tuple[float, float]] | None = json.loads(curve.read_text()) if curve.is_file() else None


def read_config(root: str | os.PathLike, version: str | None = None) -> tuple[str, str]:
    """``(version, config YAML text)`` of ``version`` (default: the published one)."""
    idx = IndexDir(root)
    version = version or idx.require_current()
    return version, (idx.path(version) / "config.yaml").read_text()


def read_cards(idx: IndexDir, version: str) -> dict[str, ModelCard]:
    """Feature key -> model card of a version, with weights resolved inside the index."""
    meta = read_manifest(idx.path(version))
    cards = {}
    for key, rel in meta["cards"].items():
        card = ModelCard.model_validate_json((idx.path(version) / rel).read_text())
        if card.weights:
            if not (is_inside(card.weights) and Path(card.weights).parts[0] == "blobs"):
                raise IndexFolderError(f"{idx.path(version) / rel}: weights {card.weights} are not in the index's "
                                       "blobs/ (an index's models run in the service: build it with copydet)")
            card = card.model_copy(update={"weights": str(idx.root / card.weights)})
        cards[key] = card
    return cards
