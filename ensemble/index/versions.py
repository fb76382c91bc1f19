"""Writing index versions: build, add, remove, compact (each one publishes a new version).

A version's ``index.json`` says what it holds::

    {"format": 1, "version": "v000002", "parent": "v000001", "op": "add", "created": "...",
     "cards": {"sscd@224": "cards/<sha256>.json"},
     "images": {"parts": ["part-00000.parquet", ...], "live": 1017, "removed": 0},
     "keys": {"sscd@224": {"dim": 512, "kind": "flat", "train_rows": 920, "pca": null,
                           "shards": [{"name": "ref-00000", "rows": 1850}, ...]}}}

Reference patches are cut into shards of at most ``shard_size`` rows as in the search stage
(:func:`ensemble.sharded.plan_shards`); the index kind is decided once for the whole set at
build and compaction (:func:`core.knn.index_kind`) and kept by adds. ``add`` writes the new
rows' shards and links the rest, then merges small shards by size tier (:func:`tier_to_merge`), so
that daily adds leave a few shards, not one per add: a request searches every shard. ``remove``
writes only the tombstone table; ``compact`` rebuilds the shards from the live rows and drops the
tombstones.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import pyarrow as pa
import pyarrow.compute as pc

from core.knn import IndexSpec, build_index, index_kind
from core.models.cards import ModelCard
from core.store import concat_tables, embeddings_to_arrow, link_file, read_table, write_table, write_text
from ensemble.index.layout import IndexDir, IndexFolderError
from ensemble.sharded import count_rows, load_rows, plan_shards

log = logging.getLogger(__name__)

FORMAT = 1
IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32())])
REMOVED_SCHEMA = pa.schema([("image_id", pa.string()), ("version", pa.string())])
ERRORS = "errors.parquet"  # the files an add could not read (its own: not linked into the next version)
Q_CURVE = "q_curve.json"  # the score -> q-value curve of the run it was built from, if it estimated one


@dataclass(frozen=True)
class KeySource:
    """Where one search key's descriptors come from: feature Parquet files of references
    (and of train/, the normalisation background) and a fitted PCA file, if any."""

    references: Sequence[str]
    train: Sequence[str] = ()
    pca: str | None = None


def read_manifest(folder: Path) -> dict:
    path = folder / "index.json"
    if not path.is_file():
        raise IndexFolderError(f"{folder}: not an index version (no index.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise IndexFolderError(f"{path}: index format {meta.get('format')!r}, this copydet reads {FORMAT}")
    named = [*meta["cards"].values(), *meta["images"]["parts"], *(m["pca"] for m in meta["keys"].values() if m["pca"]),
             *(f"keys/{key}/{s['name']}" for key, m in meta["keys"].items() for s in m["shards"])]
    outside = [n for n in named if not is_inside(n)]
    if outside:  # an index copied from elsewhere: its files are read (and merged shards deleted) by name
        raise IndexFolderError(f"{path}: names files outside its version folder: {', '.join(map(str, outside))}")
    return meta


def is_inside(rel: str | Path) -> bool:
    """Whether ``rel`` is a path below the folder it is relative to (not absolute, no ``..``)."""
    return not Path(rel).is_absolute() and ".." not in Path(rel).parts


def write_shards(key_dir: Path, files: Sequence[str], first: int, kind: str | None, spec: IndexSpec,
                 shard_size: int, done: Path | None = None) -> tuple[str, list[dict]]:
    """Shards ``ref-<first>``, ``ref-<first+1>``... of the rows of ``files`` (Parquet and faiss);
    ``kind`` None decides it from their row count. One shard is in memory at a time. With ``done``
    (a folder outside ``key_dir``) each shard is marked there once written, and a marked one is not
    written again: a stopped writer goes on from its last shard."""
    counts = count_rows(files)
    kind = kind or index_kind(sum(counts), spec)
    shards = []
    for i, slices in enumerate(plan_shards(list(zip(files, counts)), shard_size), start=first):
        name = f"ref-{i:05d}"
        mark = done / f"{name}.json" if done else None
        if mark and mark.is_file():
            shards.append(json.loads(mark.read_text()))
            continue
        ids, x = load_rows(slices)
        write_table(ids.append_column("embedding", embeddings_to_arrow(x)), key_dir / f"{name}.parquet")
        index = build_index(x, kind, spec)
        if faiss.get_num_gpus():
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(key_dir / f"{name}.faiss"))
        shards.append({"name": name, "rows": int(len(x))})
        if mark:
            write_text(mark, json.dumps(shards[-1]))
    return kind, shards


def tier(rows: int, fanout: int) -> int:
    """A shard's size tier: the whole number of times ``fanout`` fits in ``rows`` multiplicatively."""
    level = 0
    while rows >= fanout:
        rows //= fanout
        level += 1
    return level


def tier_to_merge(shards: Sequence[dict], shard_size: int, fanout: int) -> list[dict]:
    """The smallest tier holding ``fanout`` or more shards below ``shard_size`` rows (empty: none).

    Merging a tier's shards into one moves their rows a tier up, so each row is rewritten about
    log_fanout(shard_size / rows per add) times, and fewer than ``fanout`` small shards stay per
    tier (Lucene's log merge policy). ``fanout`` below 2 never merges."""
    if fanout < 2:
        return []
    tiers: dict[int, list[dict]] = {}
    for s in shards:
        if s["rows"] < shard_size:
            tiers.setdefault(tier(s["rows"], fanout), []).append(s)
    return next((group for _, group in sorted(tiers.items()) if len(group) >= fanout), [])


def next_shard(shards: Sequence[dict]) -> int:
    return 1 + max((int(s["name"].split("-")[1]) for s in shards), default=-1)  # none: compacted to nothing


def merge_tiers(key_dir: Path, k: dict, spec: IndexSpec, shard_size: int, fanout: int) -> None:
    """Merge the small shards of one key (``k``, its manifest entry) tier by tier, in place."""
    while group := tier_to_merge(k["shards"], shard_size, fanout):
        files = [str(key_dir / f"{s['name']}.parquet") for s in group]
        _, merged = write_shards(key_dir, files, next_shard(k["shards"]), k["kind"], spec, shard_size)
        for s in group:  # hard links to the parent's files, or this version's own: the parent keeps its copy
            for suffix in (".parquet", ".faiss"):
                (key_dir / f"{s['name']}{suffix}").unlink()
        gone = {s["name"] for s in group}
        k["shards"] = [s for s in k["shards"] if s["name"] not in gone] + merged


def _store_cards(idx: IndexDir, out: Path, cards: Mapping[str, ModelCard]) -> dict[str, str]:
    """Each card with its weights copied into blobs/, saved under its content hash."""
    files = {}
    for key, card in cards.items():
        if card.weights:
            card = card.model_copy(update={"weights": idx.store_blob(card.weights)})
        text = card.model_dump_json(indent=2)
        rel = f"cards/{hashlib.sha256(text.encode()).hexdigest()}.json"
        write_text(out / rel, text)
        files[key] = rel
    return files


def _meta(name: str, parent: dict | None, op: str, **fields) -> dict:
    base = {k: v for k, v in (parent or {}).items() if k not in ("version", "parent", "op", "created")}
    return {**base, "format": FORMAT, "version": name, "parent": parent["version"] if parent else None, "op": op,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields}


def _finish(out: Path, meta: dict) -> None:
    write_text(out / "index.json", json.dumps(meta, indent=2))


def build(idx: IndexDir, config_yaml: str, cards: Mapping[str, ModelCard], keys: Mapping[str, KeySource],
          images: pa.Table, spec: IndexSpec, shard_size: int, q_curve: Sequence | None = None) -> str:
    """Publish a version made from feature files (a run's, or a staging run of the build); ``q_curve``:
    the run's score -> q-value curve (``ensemble.decoys.q_curve``), kept as ``q_curve.json``."""
    with idx.publish() as (name, out):
        write_text(out / "config.yaml", config_yaml)
        if q_curve:
            write_text(out / Q_CURVE, json.dumps(q_curve))
        key_meta = {}
        for key, src in keys.items():
            if not src.references:
                raise IndexFolderError(f"index build: no reference features for {key}")
            kind, shards = write_shards(out / "keys" / key, src.references, 0, None, spec, shard_size)
            train_rows = 0
            if src.train:
                train_rows = concat_tables(src.train, out / "keys" / key / "train.parquet",
                                           ["image_id", "patch_id", "embedding"])
            pca = None
            if src.pca:
                pca = f"reduce/{key}.safetensors"
                link_file(src.pca, out / pca)
            dim = faiss.read_index(str(out / "keys" / key / f"{shards[0]['name']}.faiss")).d
            key_meta[key] = {"dim": dim, "kind": kind, "train_rows": train_rows, "pca": pca, "shards": shards}
        write_table(images.cast(IMAGES_SCHEMA), out / "images" / "part-00000.parquet")
        _finish(out, _meta(name, None, "build", cards=_store_cards(idx, out, cards), keys=key_meta,
                           images={"parts": ["part-00000.parquet"], "live": images.num_rows, "removed": 0}))
    return name


def _link_version(src: Path, out: Path, skip: tuple[str, ...] = ("index.json", ERRORS)) -> None:
    """Hard-link every file of version ``src`` into ``out`` (but ``skip``)."""
    for f in src.rglob("*"):
        if f.is_file() and str(f.relative_to(src)) not in skip:
            link_file(f, out / f.relative_to(src))


def add(idx: IndexDir, parent: str, out: Path, name: str, added: Mapping[str, Sequence[str]], images: pa.Table,
        spec: IndexSpec, shard_size: int, fanout: int = 4) -> dict:
    """Fill ``out`` (from :meth:`IndexDir.publish`) with ``parent`` plus new reference rows:
    ``added`` maps each search key to feature files of the new patches, ``images`` is their id map.
    Small shards are then merged by tiers of ``fanout`` (:func:`tier_to_merge`)."""
    meta = read_manifest(idx.path(parent))
    _link_version(idx.path(parent), out)
    keys = json.loads(json.dumps(meta["keys"]))
    for key, files in added.items():
        k = keys[key]
        _, shards = write_shards(out / "keys" / key, files, next_shard(k["shards"]), k["kind"], spec, shard_size)
        k["shards"] += shards
        merge_tiers(out / "keys" / key, k, spec, shard_size, fanout)
    part = f"part-{len(meta['images']['parts']):05d}.parquet"
    write_table(images.cast(IMAGES_SCHEMA), out / "images" / part)
    new = _meta(name, meta, "add", keys=keys, images={**meta["images"], "parts": [*meta["images"]["parts"], part],
                                                      "live": meta["images"]["live"] + images.num_rows})
    _finish(out, new)
    return new


@dataclass(frozen=True)
class Removal:
    """What ``remove`` did: the version now published, the ids it removed, those removed before
    (tombstoned since the last compaction) and those this index does not know."""

    version: str
    removed: list[str]
    already: list[str]
    unknown: list[str]


def remove(idx: IndexDir, parent: str, ids: Sequence[str]) -> Removal:
    """Publish ``parent`` with the live ``ids`` tombstoned. Nothing is published when no id is live."""
    meta = read_manifest(idx.path(parent))
    asked = pa.array(sorted(set(ids)), pa.string())
    live = set(live_images(idx.path(parent), meta, among=asked).column("image_id").to_pylist())  # of these only
    gone = set(removed_table(idx.path(parent)).column("image_id").to_pylist())
    hit, other = sorted(set(ids) & live), set(ids) - live
    already, unknown = sorted(other & gone), sorted(other - gone)
    if not hit:
        return Removal(parent, [], already, unknown)
    with idx.publish(parent) as (name, out):
        _link_version(idx.path(parent), out, skip=("index.json", ERRORS, "removed.parquet"))
        tomb = pa.concat_tables([removed_table(idx.path(parent)),
                                 pa.table({"image_id": hit, "version": [name] * len(hit)}, schema=REMOVED_SCHEMA)])
        write_table(tomb, out / "removed.parquet")
        _finish(out, _meta(name, meta, "remove", images={**meta["images"], "live": meta["images"]["live"] - len(hit),
                                                         "removed": tomb.num_rows}))
    return Removal(name, hit, already, unknown)


def compact(idx: IndexDir, parent: str, spec: IndexSpec, shard_size: int) -> str:
    """Publish ``parent`` rebuilt from its live rows: tombstones dropped, shards refilled, the
    index kind decided again for the live row count. The shards are rebuilt in ``staging/``
    without the writer's lock; takedowns published meanwhile stay tombstones of the new version.
    The staging folder is named by what the rows are made from, so a killed compaction of the same
    version goes on from its finished shards (one refused at publish is removed: a re-run compacts the
    version published since)."""
    src = idx.path(parent)
    meta = read_manifest(src)
    removed = pa.array(removed_table(src).column("image_id").to_pylist(), pa.string())
    keys = json.loads(json.dumps(meta["keys"]))
    made_of = json.dumps([parent, meta["keys"], sorted(removed.to_pylist()), repr(spec), shard_size])
    with idx.staging(f"compact-{hashlib.sha256(made_of.encode()).hexdigest()[:24]}", of_version=True) as staging:
        finished = len(list(staging.glob("done/*/*.json")))
        if finished:
            log.info(f"index compact: going on from the {finished} shard(s) a stopped compaction of {parent} built")
        for key, k in keys.items():
            staged = []
            for s in k["shards"]:
                rows = staging / "rows" / key / f"{s['name']}.parquet"
                if not rows.is_file():
                    t = read_table(src / "keys" / key / f"{s['name']}.parquet")
                    write_table(t.filter(pc.invert(pc.is_in(t.column("image_id"), removed))), rows)
                staged.append(str(rows))
            k["kind"], k["shards"] = write_shards(staging / "keys" / key, staged, 0, None, spec, shard_size,
                                                  done=staging / "done" / key)
        with idx.publish(parent, accept=lambda now: takedowns_only(idx, parent, now)) as (name, out):
            keep = ("config.yaml", Q_CURVE, "cards", "reduce")
            for f in src.rglob("*"):
                rel = f.relative_to(src)
                if f.is_file() and (rel.parts[0] in keep or rel.name == "train.parquet"):
                    link_file(f, out / rel)
            for key, k in keys.items():  # the shards only: not a temp file a killed run left beside them
                for shard in k["shards"]:
                    for f in (f"{shard['name']}.parquet", f"{shard['name']}.faiss"):
                        link_file(staging / "keys" / key / f, out / "keys" / key / f)
            live = live_images(src, meta)
            write_table(live, out / "images" / "part-00000.parquet")
            later = removed_table(idx.path(idx.current()))  # takedowns published since it read parent
            later = later.filter(pc.invert(pc.is_in(later.column("image_id"), removed)))
            if later.num_rows:
                write_table(later, out / "removed.parquet")
            _finish(out, _meta(name, meta, "compact", keys=keys, images={
                "parts": ["part-00000.parquet"], "live": live.num_rows - later.num_rows, "removed": later.num_rows}))
    return name


def takedowns_only(idx: IndexDir, parent: str, now: str) -> bool:
    """Whether ``now`` descends from ``parent`` by takedowns only (each version between still there
    to show it): then what a writer made from ``parent`` without the lock (references embedded with
    its models, PCA and background; its shards compacted) can be published on top of ``now``."""
    kept = set(idx.versions())
    while now != parent:
        meta = read_manifest(idx.path(now)) if now in kept else {}
        if meta.get("op") != "remove":
            return False
        now = meta["parent"]
    return True


def prune(idx: IndexDir, keep: int) -> tuple[list[str], int]:
    """Delete all but the newest ``keep`` versions (never the published one) and the model files
    that no kept version's cards use; returns (versions deleted, bytes freed). Files that a kept
    version shares by hard link stay; what only old versions held (rows merged, compacted or
    rebuilt away since) is freed."""
    if keep < 1:
        raise ValueError(f"index prune: keep must be >= 1, got {keep}")
    with idx.lock():
        current = idx.require_current()
        done = idx.versions()
        drop = [v for v in done[:-keep] if v != current]
        freed = 0
        for v in drop:
            trash = idx.versions_dir / f".{v}.pruned.tmp"  # not a version from here on; a crash leaves it stale
            idx.path(v).rename(trash)
            freed += sum(f.stat().st_size for f in trash.rglob("*") if f.is_file() and f.stat().st_nlink == 1)
            shutil.rmtree(trash)
        used = {json.loads((idx.path(v) / rel).read_text()).get("weights")
                for v in done if v not in drop for rel in read_manifest(idx.path(v))["cards"].values()}
        for blob in sorted((idx.root / "blobs").glob("*")) if (idx.root / "blobs").is_dir() else []:
            if str(blob.relative_to(idx.root)) not in used:
                freed += blob.stat().st_size
                blob.unlink()
    return drop, freed


def removed_table(folder: Path) -> pa.Table:
    path = folder / "removed.parquet"
    return read_table(path) if path.is_file() else REMOVED_SCHEMA.empty_table()


def live_images(folder: Path, meta: dict, written: bool = False, among: pa.Array | None = None) -> pa.Table:
    """The id map of a version without its tombstoned images; with ``written``, also when each
    row was recorded (``written_ns``: the st_mtime of its id-map part, kept by hard links); with
    ``among``, only the rows of those ids are read."""
    parts = []
    where = None if among is None else pc.field("image_id").isin(among)
    for p in meta["images"]["parts"]:
        part = read_table(folder / "images" / p, where=where).cast(IMAGES_SCHEMA)
        if written:
            ns = (folder / "images" / p).stat().st_mtime_ns
            part = part.append_column("written_ns", pa.array([ns] * part.num_rows, pa.int64()))
        parts.append(part)
    table = pa.concat_tables(parts) if parts else IMAGES_SCHEMA.empty_table()
    removed = pa.array(removed_table(folder).column("image_id").to_pylist(), pa.string())
    return table.filter(pc.invert(pc.is_in(table.column("image_id"), removed)))
