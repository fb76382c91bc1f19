"""``copydet run --reuse RUN``: a new run starts from another run's reference and train shards.

New queries against the same references (a day's uploads, ISC21's second phase) would describe
every reference and train photo again: at DISC21 scale most of a run's work. A shard folder of
RUN (manifest, patches, features, reduced features) lends the shards of a split when RUN pinned
exactly this run's files for that split (``inputs.parquet``) and recorded the settings this run
gives that split's shards; they become hard links (atomic copies across file systems), which
the stages then skip as finished. Whatever is not lent is made as usual, so a partial RUN lends
what it finished.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from core.settings import as_recorded, changes, read_settings
from core.store import exists, join, link_file, read_table
from jobs.config import PipelineConfig
from jobs.inputs import InputError, input_changes, manifest_hashes
from jobs.layout import RunDir, shard_names
from jobs.preflight import stage_folders

log = logging.getLogger(__name__)

LENT = ("reference", "train")  # queries are what changes
LENDING = ("manifest", "patch", "extract", "reduce")  # the stages whose shards are per image


def _manifest_part(settings: dict, split: str) -> dict:
    return {**settings, "folders": settings.get("folders", {}).get(split)}


def _patch_part(settings: dict, split: str) -> dict:
    return {"views": settings.get(split), "detector": settings.get(f"{split}_detector_sha256")}


# stage -> the part of its folder's settings that one split's shards depend on (default: all)
SPLIT_PART: dict[str, Callable[[dict, str], dict]] = {"manifest": _manifest_part, "patch": _patch_part}


def lender(path: str, run: RunDir) -> RunDir:
    """The run folder ``--reuse`` names, if it is one (pinned inputs, a manifest) other than ``run``."""
    source = RunDir(path)
    if "://" in path or "://" in run.root:
        raise InputError(f"--reuse {path}: shards are lent as hard links, between local run folders only")
    if os.path.realpath(source.root) == os.path.realpath(run.root):
        raise InputError(f"--reuse {path} is this run's own folder (--out): name the run whose shards to start from")
    if not (exists(source.inputs) and read_settings(source.manifest)):
        raise InputError(f"--reuse {path}: not a run folder with pinned inputs and a manifest (made by `copydet run` "
                         "or `copydet manifest`)")
    return source


def split_images(inputs: pa.Table, split: str) -> pa.Table:
    """``split``'s images (rows of ``inputs.parquet``) in folder order."""
    return inputs.filter(pc.and_(pc.equal(inputs.column("split"), split), pc.is_null(inputs.column("error"))))


def same(a: pa.Table, b: pa.Table, columns: list[str]) -> bool:
    return a.select(columns).combine_chunks().equals(b.select(columns).combine_chunks())


def lent_splits(run: RunDir, source: RunDir) -> list[str]:
    """The splits of :data:`LENT` whose files ``source`` was made from, in the same order: a file
    with a new mtime is the same file when its bytes hash as ``source``'s manifest recorded
    (a copied or restored dataset, as :func:`jobs.inputs.pin_inputs` accepts). The others are named."""
    mine, theirs = read_table(run.inputs), read_table(source.inputs)
    hashes, max_pixels = None, (read_settings(source.manifest) or {}).get("max_pixels")
    splits = []
    for split in LENT:
        new, old = split_images(mine, split), split_images(theirs, split)
        if not new.num_rows:
            continue
        if not same(new, old, ["image_id", "path", "size", "mtime_ns"]):
            hashes = manifest_hashes(source) if hashes is None else hashes
            changed = input_changes(old, new, hashes, max_pixels)
            if changed or not same(new, old, ["image_id", "path"]):
                log.info(f"reuse: {split} not lent: its files are not those {source.root} was made from "
                         f"({'; '.join(changed) or 'in another order'})")
                continue
        splits.append(split)
    return splits


def lendable(stage: str, theirs: str, settings: dict, splits: Sequence[str]) -> list[str]:
    """The ``splits`` whose part of the settings recorded in folder ``theirs`` is the part of this
    run's ``settings`` (see :data:`SPLIT_PART`); the others named with what changed."""
    recorded = read_settings(theirs)
    if recorded is None:  # the lender never made this folder
        return []
    part = SPLIT_PART.get(stage, lambda whole, _: whole)
    mine = as_recorded(settings)
    ok = []
    for split in splits:
        changed = changes(part(recorded, split), part(mine, split))
        if changed:
            log.info(f"reuse: {theirs} not lent for {split}: made with other settings ({'; '.join(changed)})")
        else:
            ok.append(split)
    return ok


UPSTREAM = {"manifest": "inputs", "patch": "manifest", "extract": "patch"}


def upstream_splits(stage: str, folder: str, lent: dict[str, list[str]], members: dict[str, list[str]]) -> list[str]:
    """The splits a stage folder may lend: those its upstream lent (a shard's name and rows follow
    from its upstream shards, whose settings its own do not repeat). ``lent``: the splits lent per
    stage, and per feature folder; ``members``: a reduced folder's member feature folders."""
    if stage == "reduce":  # a PCA or stretching fit on other train features changes every split's rows
        ok = [s for s in lent["patch"] if all(s in lent.get(m, ()) for m in members[folder])]
        return ok if "train" in ok else []
    return lent[UPSTREAM[stage]]


def lent_files(stage: str, theirs: str, folder: str, splits: Sequence[str], run: RunDir, source: RunDir,
               pca_key: str | None = None) -> list[tuple[str, str]]:
    """``(source file, run's file)`` of the shards of ``splits`` in folder ``theirs``, with what goes
    with them: a manifest shard's errors (first: a manifest shard marks its block done), a reduced
    folder's PCA (``pca_key``'s; only where the run has none of its own)."""
    names = [n for split in splits for n in shard_names(theirs, split)]
    pairs = []
    if stage == "manifest":
        pairs += [(join(source.errors, n), join(run.errors, n)) for n in names]
    if pca_key and names:
        mine, theirs_pca = run.pca(pca_key), source.pca(pca_key)
        if exists(mine) and not (exists(theirs_pca) and os.path.samefile(mine, theirs_pca)):
            return []
        pairs.append((theirs_pca, mine))
    return pairs + [(join(theirs, n), join(folder, n)) for n in names]


def lend(cfg: PipelineConfig, run: RunDir, source: RunDir) -> int:
    """Hard-link ``source``'s lendable reference and train shards into ``run`` (those it lacks);
    returns how many files were linked."""
    lent = {"inputs": lent_splits(run, source)}
    groups = cfg.reduce_groups() if cfg.reduce.active else []
    members = {run.features(out): [run.features(k) for k in keys] for keys, out in groups}
    pca_keys = {run.features(out): out for _, out in groups}
    linked: Counter[str] = Counter()
    for stage, folder, settings, _ in stage_folders(cfg, run, LENDING if lent["inputs"] else ()):
        theirs = join(source.root, os.path.relpath(folder, run.root))
        ok = lendable(stage, theirs, settings, upstream_splits(stage, folder, lent, members))
        lent[folder if stage in ("extract", "reduce") else stage] = ok
        for src, dest in lent_files(stage, theirs, folder, ok, run, source, pca_keys.get(folder)):
            if exists(src) and not exists(dest):
                link_file(src, dest)
                linked[os.path.relpath(os.path.dirname(dest), run.root)] += 1
    if linked:
        log.info(f"reuse: {', '.join(lent['inputs'])} from {source.root}: "
                 + ", ".join(f"{rel} {n} file(s)" for rel, n in linked.items()) + " (hard links)")
    else:
        log.info(f"reuse: nothing new to take from {source.root}")
    return sum(linked.values())
