"""A run's inputs, checked before anything runs: its image folders, the pinned file list, the ground truth.

Every file under a split folder is either an image (``image_id`` = its path without extension)
or a rejected path with its reason (:func:`core.imageio.scan_images`); two files with one id
stop the run. The list, with each file's size and mtime, is pinned in ``RUN/inputs.parquet`` the
first time; a re-run whose files changed is refused, naming them, since the run's shards were
made from the old files. A file with a new mtime whose bytes hash to the manifest's SHA-256 (a
copied or restored dataset), or that still does not decode when the manifest could not decode
it, is the same file: the pin takes its new mtime. The ground truth may
only name images of the inputs, once per pair.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from core.imageio import IMAGE_SUFFIXES, FolderScan, ImageDecodeError, load_rgb, scan_images, sha256_file
from core.metrics import read_ground_truth
from core.settings import read_settings
from core.store import exists, list_shards, read_table, write_table
from jobs.config import SPLIT_FOLDERS, DataConfig
from jobs.layout import RunDir

log = logging.getLogger(__name__)

INPUTS_SCHEMA = pa.schema([
    ("split", pa.string()), ("image_id", pa.string()), ("path", pa.string()),
    ("size", pa.int64()), ("mtime_ns", pa.int64()), ("error", pa.string()),  # error: null for images
])
SHOWN = 8  # names quoted per kind of problem
HASH_THREADS = 8
UNDECODED = ""  # manifest_hashes' value for a file the manifest could not decode


class InputError(ValueError):
    """Inputs that would give a wrong result; the message names the folder, files or ids."""


def some_of(items: list) -> str:
    """The first few of ``items`` for a message, with the count when there are more."""
    return ", ".join(map(str, items[:SHOWN])) + (f" ... ({len(items)} in all)" if len(items) > SHOWN else "")


def split_folders(data: DataConfig, required: Collection[str] = ()) -> dict[str, str]:
    """split -> folder. A configured path that does not exist, or a ``required`` split without
    a folder, is an :class:`InputError` naming the config key."""
    if data.root and not Path(data.root).is_dir():
        raise InputError(f"data.root: {data.root} is not a folder")
    for sub in SPLIT_FOLDERS.values():
        given = getattr(data, sub)
        if given and not Path(given).is_dir():
            raise InputError(f"data.{sub}: {given} is not a folder")
    if data.ground_truth and not Path(data.ground_truth).is_file():
        raise InputError(f"data.ground_truth: {data.ground_truth} is not a file")
    folders = data.folders()
    for split in required:
        if split not in folders:
            sub = SPLIT_FOLDERS[split]
            where = f"{Path(data.root) / sub} does not exist" if data.root else f"set data.{sub} (--{sub}) or data.root"
            raise InputError(f"data.{sub}: no {sub} folder ({where})")
    check_apart(folders)
    return folders


# what a split's images would do inside another split's folder
OVERLAPS = {("reference", "query"): "each query would find itself among the references",
            ("train", "reference"): "normalisation would subtract each reference's similarity to itself",
            ("train", "query"): "normalisation would subtract each query's similarity to itself"}


def check_apart(folders: dict[str, str]) -> None:
    """Refuse split folders that are one folder, or one inside another (folders are scanned whole)."""
    real = {split: Path(folder).resolve() for split, folder in folders.items()}
    for (a, b), why in OVERLAPS.items():
        if a in real and b in real and (real[a] == real[b] or real[a] in real[b].parents
                                        or real[b] in real[a].parents):
            how = "the same folder" if real[a] == real[b] else "one inside the other"
            raise InputError(f"data.{SPLIT_FOLDERS[a]} ({folders[a]}) and data.{SPLIT_FOLDERS[b]} ({folders[b]}) are "
                             f"{how}: {why}; give each split its own folder")


def check_unique_ids(scan: FolderScan, folder: str, what: str) -> None:
    """Refuse an id that two files of ``folder`` give (``Q3.jpg`` and ``Q3.png``): which one is ``Q3``?"""
    dups = scan.duplicates()
    if dups:
        named = some_of([f"{i!r} ({' and '.join(p)})" for i, p in dups.items()])
        raise InputError(f"{what}: {len(dups)} image id(s) of {folder} are given by more than one file (an id is "
                         f"the file name without extension): {named}; rename or remove one of each")


def scan_inputs(folders: dict[str, str]) -> pa.Table:
    """Every file under the split folders as INPUTS_SCHEMA rows; refuses an id given by two files
    and a folder without images."""
    rows = []
    for split, folder in folders.items():
        scan = scan_images(os.path.abspath(folder))  # absolute: stages and commands may run from elsewhere
        check_unique_ids(scan, folder, f"data.{SPLIT_FOLDERS[split]}")
        if not scan.files:
            raise InputError(f"data.{SPLIT_FOLDERS[split]}: {folder} has no image files (accepted extensions: "
                             f"{' '.join(IMAGE_SUFFIXES)}; {len(scan.rejected)} other file(s))")
        rows += [{"split": split, "image_id": f.image_id, "path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
                 for f in scan.files]
        rows += [{"split": split, "path": p, "error": f"{p}: {reason}"} for p, reason in scan.rejected]
    return pa.Table.from_pylist(rows, schema=INPUTS_SCHEMA)


def images(inputs: pa.Table, limit: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """split -> ``(image_id, path)`` of its images in folder order (the first ``limit`` of each)."""
    out: dict[str, list[tuple[str, str]]] = {}
    ok = inputs.filter(pc.is_null(inputs.column("error")))
    for split, image_id, path in zip(*(ok.column(c).to_pylist() for c in ("split", "image_id", "path"))):
        out.setdefault(split, []).append((image_id, path))
    return {s: files[:limit] if limit else files for s, files in out.items()}


def _stamps(inputs: pa.Table) -> dict[tuple[str, str], tuple[int, int]]:
    ok = inputs.filter(pc.is_null(inputs.column("error")))
    cols = (ok.column(c).to_pylist() for c in ("split", "path", "size", "mtime_ns"))
    return {(s, os.path.abspath(p)): (n, t) for s, p, n, t in zip(*cols)}  # lists pinned before were relative


def as_made(path: str, sha256: str, max_pixels: int | None) -> bool:
    """Whether ``path`` still is what the manifest made of it: bytes of hash ``sha256``, or, for a
    file it could not decode (``sha256`` is :data:`UNDECODED`), a file that still does not."""
    if sha256 != UNDECODED:
        return sha256_file(path) == sha256
    try:
        load_rgb(path, max_pixels=max_pixels)
    except ImageDecodeError:
        return True
    return False


def input_changes(old: pa.Table, new: pa.Table, sha256: Mapping[str, str] | None = None,
                  max_pixels: int | None = None) -> list[str]:
    """``added: ...``, ``removed: ...``, ``changed: ...`` between two file lists. A file of another
    size is changed; one of another mtime is changed unless it is as the manifest made it
    (:func:`as_made`; ``sha256``: path -> the manifest's hash)."""
    a, b, sha256 = _stamps(old), _stamps(new), sha256 or {}
    moved = [k for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    touched = [k[1] for k in moved if a[k][0] == b[k][0] and k[1] in sha256]
    with ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib releases the GIL: reads and hashes overlap
        kept = pool.map(lambda p: as_made(p, sha256[p], max_pixels), touched)
        same = {p for p, ok in zip(touched, kept) if ok}
    kinds = {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()),
             "changed": [k for k in moved if k[1] not in same]}
    return [f"{len(keys)} {kind} ({some_of([p for _, p in keys])})" for kind, keys in kinds.items() if keys]


def manifest_hashes(run: RunDir) -> dict[str, str]:
    """path -> SHA-256 of the images the run's manifest holds so far, :data:`UNDECODED` for the
    files it could not decode."""
    hashes = {os.path.abspath(p): UNDECODED for shard in list_shards(run.errors)
              for p in read_table(shard, columns=["path"]).column("path").to_pylist()}
    for shard in list_shards(run.manifest):
        table = read_table(shard, columns=["path", "sha256"])
        hashes.update((os.path.abspath(p), h) for p, h in zip(table.column("path").to_pylist(),
                                                               table.column("sha256").to_pylist()))
    return hashes


def pin_inputs(run: RunDir, folders: dict[str, str]) -> pa.Table:
    """Scan the folders and pin the file list in ``RUN/inputs.parquet``, or refuse if it changed
    once the manifest holds shards made from it; files whose only change is their mtime are
    pinned again with it. Before the manifest's first shard (e.g. a run refused by its early
    checks), nothing was made from the old list, so the new one replaces it."""
    new = scan_inputs(folders)
    if not exists(run.inputs) or not list_shards(run.manifest):
        write_table(new, run.inputs)
        return new
    old = read_table(run.inputs)
    a, b = _stamps(old), _stamps(new)
    if a == b:
        return new
    changes = input_changes(old, new, manifest_hashes(run), (read_settings(run.manifest) or {}).get("max_pixels"))
    if changes:
        raise InputError(f"{run.root}: the input images changed since this run folder was made from them "
                         f"({run.inputs}): {'; '.join(changes)}; its shards hold the old files, so run into a "
                         f"new folder (--out; `copydet run --reuse {run.root}` starts it from this run's reference and "
                         "train shards, where their files are the same)")
    log.info("%s: %d input file(s) have new mtimes but the bytes the manifest hashed; pinned again",
             run.root, sum(a[k] != v for k, v in b.items()))
    write_table(new, run.inputs)
    return new


def recheck_inputs(run: RunDir) -> None:
    """Refuse a run folder whose images changed since it pinned them (:func:`pin_inputs` against
    the folders its manifest records); nothing to check before it pinned any."""
    if exists(run.inputs):
        pin_inputs(run, (read_settings(run.manifest) or {}).get("folders", {}))


def check_pair_ids(pairs: Iterable[tuple[str, str]], inputs: pa.Table, what: str) -> None:
    """Refuse (query, reference) ``pairs`` naming ids that are no image of their split in
    ``inputs``; the :class:`InputError` starts with ``what`` (``{n}``: how many ids)."""
    ids = {s: {i for i, _ in files} for s, files in images(inputs).items()}
    unknown: set[str] = set()
    for q, r in pairs:
        if q not in ids.get("query", ()):
            unknown.add(f"query {q!r}")
        if r not in ids.get("reference", ()):
            unknown.add(f"reference {r!r}")
    if unknown:
        raise InputError(f"{what.format(n=len(unknown))} are not images of this run's queries/references (an id "
                         f"is the file name without extension): {some_of(sorted(unknown))}")


def check_ground_truth(path: str, inputs: pa.Table, limit: int | None = None) -> list[tuple[str, str]]:
    """The ground-truth pairs, if every id names an image of its split in ``inputs`` (and no pair
    repeats: :func:`core.metrics.read_ground_truth`); else an :class:`InputError` naming them.

    With ``data.limit`` (``limit``) only pairs of the images taken are returned: a copy whose query
    or reference was left out cannot be found, and counting it as missed would understate recall."""
    pairs = read_ground_truth(path)
    check_pair_ids(pairs, inputs, f"{path}: {{n}} id(s) of the ground truth")
    if not limit:
        return pairs
    taken = {s: {i for i, _ in files} for s, files in images(inputs, limit).items()}
    kept = [(q, r) for q, r in pairs if q in taken.get("query", ()) and r in taken.get("reference", ())]
    if len(kept) < len(pairs):
        log.info(f"{path}: {len(pairs) - len(kept)} of {len(pairs)} pair(s) name images past data.limit "
                 f"{limit}; scoring the other {len(kept)}")
    return kept


def run_ground_truth(path: str, run: RunDir, inputs: pa.Table | None = None) -> list[tuple[str, str]]:
    """The ground-truth pairs of ``run``'s images (its pinned ``inputs``, read when not given, within
    its ``data.limit``)."""
    if inputs is None and not exists(run.inputs):
        return read_ground_truth(path)
    inputs = read_table(run.inputs) if inputs is None else inputs
    return check_ground_truth(path, inputs, (read_settings(run.manifest) or {}).get("limit"))
