"""``copydet index ACTION``: the living reference index.

  copydet index build [CONFIG] --out INDEX_DIR [--references DIR --train DIR]
  copydet index build --from-run RUN_DIR --out INDEX_DIR   # the run's own config and features
  copydet index add INDEX_DIR FOLDER        # embeds only the new images, publishes a version
  copydet index remove INDEX_DIR ID... [--ids-file FILE]
  copydet index compact INDEX_DIR           # rebuild shards without the removed references
  copydet index prune INDEX_DIR [--keep 2]  # delete old versions and the files only they use
  copydet index info INDEX_DIR              # versions, counts, models, sizes, is-copy threshold
  copydet index match INDEX_DIR FOLDER --out OUT_DIR   # every image of FOLDER answered, offline
                                             # (on serve.num_replicas workers: --set serve.num_replicas=4)
  copydet index match INDEX_DIR FILE...    # a few images answered and printed: copy of what, how sure

The actions that change an index import :mod:`jobs.indexing` (torch, the stage runners) when
they run; ``info`` and ``prune`` start in about a second.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from core.yamlconf import load_yaml
from ensemble.index.layout import IndexDir, folder_bytes
from ensemble.index.reader import read_config
from ensemble.index.versions import Q_CURVE, prune, read_manifest
from jobs.commands.base import LOCAL_RAY, arg, command, positive_int
from jobs.commands.stages import config_with_folders
from jobs.config import validate
from jobs.inputs import some_of, split_folders
from jobs.layout import RunDir
from jobs.lock import locked

log = logging.getLogger(__name__)


def _one(args: argparse.Namespace, what: str) -> str:
    if not args.target:
        raise ValueError(f"index {args.action}: {what} is required")
    return args.target


def _existing(args: argparse.Namespace) -> str:
    """INDEX_DIR, refused when it is not an index before the indexing imports take seconds."""
    root = _one(args, "INDEX_DIR")
    IndexDir(root).require_current()
    return root


def _build(args: argparse.Namespace) -> None:
    if not args.out:
        raise ValueError("index build: --out INDEX_DIR is required")
    if args.from_run:
        from jobs import indexing

        if args.target:
            raise ValueError(f"index build --from-run: {args.target}: give no CONFIG, the run's own "
                             f"{Path(args.from_run) / 'config.yaml'} is the one its features were made with")
        indexing.build_from_run(args.from_run, args.out, indexing.run_config(args.from_run, args.set or []))
        return
    args.config, out, args.out = args.target, args.out, None
    cfg = config_with_folders(args)
    split_folders(cfg.data, ("reference",))  # a missing folder is refused before the imports below take seconds
    from jobs import indexing

    indexing.build_from_folders(cfg, out, args.address)


def _add(args: argparse.Namespace) -> int:
    if len(args.rest) != 1:
        raise ValueError("index add: give one FOLDER of images to add")
    root = _existing(args)
    from jobs import adding

    try:
        name, added, errors = adding.add_folder(root, args.rest[0], list(args.set or []), args.address)
    except adding.NothingAdded as e:
        log.error(f"index add: {e}")
        return 1
    for line in errors:
        log.warning(f"index add: skipped {line}")
    if not added:
        unread = f"; the {len(errors)} file(s) above could not be read" if errors else ""
        log.info(f"index add: nothing published: every image of {args.rest[0]} that reads is in {name} already"
                 + unread)
        return 0
    log.info(f"index add: published {name} with {added} new reference(s)"
             + (f"; {len(errors)} file(s) could not be read (listed in its errors.parquet)" if errors else ""))
    return 0


def _remove(args: argparse.Namespace) -> int:
    root = _existing(args)
    from jobs import indexing

    ids = list(args.rest)
    if args.ids_file:
        text = Path(args.ids_file).read_text(encoding="utf-8-sig")  # a spreadsheet's export starts with a BOM
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError("index remove: give the reference ids to remove (or --ids-file)")
    done = indexing.remove_ids(root, ids)
    if done.already:
        log.info(f"index remove: removed before: {some_of(done.already)}")
    if done.removed:
        log.info(f"index remove: published {done.version} without {len(done.removed)} reference(s)")
    if done.unknown:  # a takedown list with a typo must not pass as done (a retry's "removed before" does)
        log.error(f"index remove: not references of {root}, nothing removed for them: {some_of(done.unknown)}")
        return 1
    return 0


def _compact(args: argparse.Namespace) -> None:
    root = _existing(args)
    from jobs import indexing

    name = indexing.compact(root)
    log.info(f"index compact: published {name}")


def _prune(args: argparse.Namespace) -> None:
    dropped, freed = prune(IndexDir(_one(args, "INDEX_DIR")), args.keep or KEEP)
    span = f" ({' to '.join(sorted({dropped[0], dropped[-1]}))})" if dropped else ""
    log.info(f"index prune: deleted {len(dropped)} version(s){span}, {freed / 2**20:.1f} MiB freed")


def info_lines(root: str) -> list[str]:
    """Versions (the published one marked), and the published version's keys, models and counts."""
    idx = IndexDir(root)
    current = idx.require_current()
    lines = [f"index {root}", "versions:"]
    for v in idx.versions():
        m = read_manifest(idx.path(v))
        lines.append(f"  {'*' if v == current else ' '} {v}  {m['op']:8s} {m['created']}  "
                     f"{m['images']['live']} live, {m['images']['removed']} removed  "
                     f"{folder_bytes(idx.path(v)) / 2**20:.1f} MiB")
    m = read_manifest(idx.path(current))
    lines.append(f"published: {current}")
    for key, k in m["keys"].items():
        rows = sum(s["rows"] for s in k["shards"])
        lines.append(f"  {key}: {rows} reference patches in {len(k['shards'])} shard(s), {k['kind']} index, "
                     f"dim {k['dim']}, {k['train_rows']} train descriptors{', PCA' if k.get('pca') else ''}")
    for key, rel in m["cards"].items():
        lines.append(f"  model {key}: {Path(rel).stem[:12]}")
    lines.append(threshold_line(idx, current))
    blobs = idx.root / "blobs"
    model_bytes = folder_bytes(blobs) if blobs.is_dir() else 0
    version_bytes = folder_bytes(idx.versions_dir, distinct=True)
    lines.append(f"on disk: {(model_bytes + version_bytes) / 2**20:.1f} MiB in all: "
                 f"model files {model_bytes / 2**20:.1f} MiB (blobs/, shared by every version), "
                 f"versions {version_bytes / 2**20:.1f} MiB (a file that versions share is counted once; "
                 "`index prune` deletes old versions)")
    if idx.stale():
        lines.append(f"unfinished writes (left by killed commands; removed by the next write): "
                     f"{[p.name for p in idx.stale()]}")
    staged = sorted(p.name for p in (idx.root / "staging").glob("job-*"))
    if staged:
        lines.append(f"adds or compactions at work, or stopped (run again on the same version, one goes on from "
                     f"its folder; other writers remove stopped ones): {staged}")
    return lines


def threshold_line(idx: IndexDir, version: str) -> str:
    """The is-copy threshold ``version`` answers with, and whether it is calibrated (q-values)."""
    _, text = read_config(idx.root, version)
    cfg = validate(load_yaml(text), f"{idx.path(version)}/config.yaml")
    if (idx.path(version) / Q_CURVE).is_file():
        how = "estimated by the run it was built from; q-values from that run's curve"
    elif isinstance(cfg.fuse.threshold, float):
        how = "the config's fuse.threshold; no q-values"
    else:
        how = "serve.threshold, not calibrated: no run's estimate (index build --from-run gives one); no q-values"
    return f"is-copy threshold: {cfg.copy_threshold():.4f} ({how})"


def _match(args: argparse.Namespace) -> int | None:
    if args.rest and not any(os.path.isdir(p) for p in args.rest):
        return _match_files(args)
    if len(args.rest) != 1 or not args.out:
        raise ValueError("index match: give one FOLDER of images and --out OUT_DIR (the answers' folder), "
                         "or image FILEs (answered here)")
    root, folder, out = _existing(args), args.rest[0], args.out
    from jobs.matching import match_folder

    with locked(RunDir(out), "use another --out"):
        m = match_folder(root, folder, out, list(args.set or []), args.address)
        unread = f"; {m.errors} file(s) could not be read ({out}/errors.parquet)" if m.errors else ""
        log.info(f"index match: {m.images} image(s) of {folder} against {root} ({m.version}): {m.copies} pair(s) at "
                 f"or above the is-copy threshold {m.threshold:.4f}{unread} -> {out}/matches.csv, {out}/copies.csv")


def _match_files(args: argparse.Namespace) -> int:
    """A few image files answered in this process, printed for a person; 1 when one does not read."""
    if args.out or args.address:
        given = "--out" if args.out else "--address"
        raise ValueError(f"index match: {given} is for a FOLDER of images; image FILEs are answered in this process")
    missing = [p for p in args.rest if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"index match: not files or folders: {some_of(missing)}")
    root = _existing(args)
    from jobs.matching import answer_lines, answers
    from jobs.serve.engine import Matcher

    matcher, unread = Matcher(root, None, list(args.set or [])), 0
    for path, answer in zip(args.rest, answers(matcher, args.rest)):
        print("\n".join(answer_lines(path, answer, matcher.index.paths.get)), flush=True)
        unread += not isinstance(answer, dict)
    return 1 if unread else 0


def _info(args: argparse.Namespace) -> None:
    print("\n".join(info_lines(_one(args, "INDEX_DIR"))))


KEEP = 2  # versions prune keeps by default

ACTIONS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "build": _build, "add": _add, "remove": _remove, "compact": _compact, "prune": _prune, "info": _info,
    "match": _match,
}


@command("index", "the living reference index: build, add, remove, compact, prune, info (versions switch "
         "atomically); match a folder of images, or image files, against it",
         arg("action", choices=sorted(ACTIONS), help="what to do"),
         arg("target", nargs="?", help="build: the pipeline YAML; otherwise INDEX_DIR"),
         arg("rest", nargs="*", default=[], metavar="ARG",
             help="add: FOLDER of images; match: FOLDER, or image FILEs; remove: reference ids"),
         arg("--out", help="build: the index folder to create or publish a new version in; match: the folder of "
             "answers (matches.csv, copies.csv; a re-run goes on where it stopped)"),
         arg("--from-run", help="build: publish a finished run's features instead of extracting (with the "
             "run's own config: no CONFIG, --set serve.*, index.*, ray.* only)"),
         arg("--references", help="build: folder of reference images"),
         arg("--train", help="build: folder of train images (normalisation background, PCA)"),
         arg("--ids-file", help="remove: a file of reference ids, one a line"),
         arg("--keep", type=positive_int, help=f"prune: the newest versions kept (default {KEEP}: the published "
             "one and the one replicas may still be swapping from)"),
         arg("--set", action="append", metavar="KEY=VALUE",
             help="override a config key (repeatable); add, match: serve.*, index.* and ray.* only"),
         arg("--address", help=f"build, add (index.num_workers), match (serve.num_replicas): {LOCAL_RAY}"),
         uses_config=False)
def index(args: argparse.Namespace) -> int | None:
    check_options(args)
    return ACTIONS[args.action](args)


OPTION_ACTIONS = {"out": "build match", "from_run": "build", "references": "build", "train": "build",
                  "address": "build add match", "set": "build add match", "ids_file": "remove", "keep": "prune",
                  "rest": "add remove match"}


def check_options(args: argparse.Namespace) -> None:
    """Refuse an option (or extra argument) of another action: given to this one, it would be ignored."""
    stray = [k for k, actions in OPTION_ACTIONS.items()
             if args.action not in actions.split() and getattr(args, k) not in (None, [])]
    if stray:
        named = "; ".join(f"{' '.join(args.rest) if k == 'rest' else '--' + k.replace('_', '-')} is for "
                          f"{' and '.join(OPTION_ACTIONS[k].split())}" for k in stray)
        raise ValueError(f"index {args.action}: {named}")
