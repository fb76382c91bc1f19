"""``copydet index match INDEX FOLDER --out OUT``: every image of a folder against the living index.

A day's uploads, checked in one command and without a server: each image gets the service's
answer (:class:`jobs.serve.engine.Matcher`: the pipeline's views, models, search, fusion and
verification over one index version, takedowns included). The version, the folder and its file
list are pinned in ``OUT/_settings.json``, so a re-run goes on from the last window of images
written (``OUT/parts/``) and answers as the first did; then ``OUT/matches.csv`` (ISC21
``query_id,reference_id,score`` with ``q_value``, ``verified`` and ``inliers``), ``OUT/copies.csv``
(the pairs at or above the index's is-copy threshold) and ``OUT/errors.parquet`` (files that do not
read) are written from the parts, one part in memory at a time. Given image files instead of a
folder, the command prints each one's answer (:func:`answer_lines`): a few uploads checked from a shell.

Windows are answered by ``serve.num_replicas`` workers, each a :class:`WindowWorker` that loads the
models and the index once and writes its own parts: one in this process (no Ray), more (or any
number, given ``--address`` or ``ray.address``) as Ray actors with the service's per-replica
resources, on the embedded local Ray or that cluster (whose nodes must see the index, the folder
and OUT at the same paths).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from core.contracts import ERRORS_SCHEMA
from core.imageio import ImageDecodeError, ImageFile, file_list_hash, load_rgb, scan_images
from core.metrics import write_predictions, written
from core.settings import pin_settings, read_settings
from core.store import absolute, join, list_shards, read_table, write_table
from ensemble.index.layout import IndexDir
from jobs.config import PipelineConfig
from jobs.indexing import index_config
from jobs.inputs import InputError, check_unique_ids
from jobs.runtime import BAR_DELAY, WorkerFailed, on_workers
from jobs.serve.engine import Matcher
from jobs.stages.fuse import copies

log = logging.getLogger(__name__)

WINDOW = 64  # images per part file: what a re-run does again at most, and the replicas' unit of work
PARTS, ERRORS = "parts", "errors"  # OUT's folders of the windows' answers and unread files
MATCHES_SCHEMA = pa.schema([("query_id", pa.string()), ("reference_id", pa.string()), ("score", pa.float32()),
                            ("q_value", pa.float64()), ("verified", pa.float64()), ("inliers", pa.float64())])
EXTRA = ["q_value", "verified", "inliers"]  # matches.csv's columns after the ISC21 three (empty: not known)


@dataclass
class Matched:
    images: int
    copies: int
    errors: int
    threshold: float
    version: str


def pin_answers(out: str, root: str, folder: str, version: str, files: list[ImageFile]) -> None:
    """Record what ``out``'s answers come from, or refuse an ``out`` started on another index,
    version, folder, file list or window size (its windows would mix them)."""
    settings = {"index": os.path.abspath(root), "version": version, "folder": os.path.abspath(folder),
                "files": len(files), "files_sha256": file_list_hash(files), "window": WINDOW}
    pin_settings(out, settings, "index match", advice="use another --out", made="answers")


def answer_rows(f: ImageFile, answer: dict) -> list[dict]:
    return [{"query_id": f.image_id, "reference_id": m["reference_id"], "score": m["score"], "q_value": m["q_value"],
             "verified": None if m["verified"] is None else float(m["verified"]), "inliers": m["inliers"]}
            for m in answer["matches"]]


def answers(matcher: Matcher, paths: Sequence[str]) -> Iterator[dict | ImageDecodeError]:
    """Each image file's answer (:meth:`Matcher.match`), or why it does not read, in the order
    given; embedded ``serve.max_batch_size`` at a time, as the service batches requests."""
    batch = matcher.cfg.serve.max_batch_size
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        out: list[dict | ImageDecodeError | None] = [None] * len(chunk)
        images, read = [], []
        for i, path in enumerate(chunk):
            try:
                images.append(load_rgb(path, max_pixels=matcher.cfg.data.max_pixels))
                read.append(i)
            except ImageDecodeError as e:
                out[i] = e
        for i, answer in zip(read, matcher.match(images, [chunk[i] for i in read]) if images else []):
            out[i] = answer
        yield from out


def match_window(matcher: Matcher, files: list[ImageFile],
                 progress: Callable[[int], object] | None = None) -> tuple[pa.Table, pa.Table]:
    """One window's answers and the files of it that do not read; ``progress`` counts images done."""
    rows, errors = [], []
    for f, answer in zip(files, answers(matcher, [f.path for f in files])):
        if isinstance(answer, ImageDecodeError):
            errors.append({"path": f.path, "error": str(answer)})
        else:
            rows += answer_rows(f, answer)
        if progress:
            progress(1)
    return (pa.Table.from_pylist(rows, schema=MATCHES_SCHEMA),
            pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))


def answer_lines(path: str, answer: dict | ImageDecodeError,
                 where: Callable[[str], str | None] = lambda reference_id: None) -> list[str]:
    """A person's reading of one answer: is it a copy, of which references (each at or above the
    threshold; else the best one; ``where`` gives a reference's file), how sure (q-value) and what
    verification found."""
    if isinstance(answer, ImageDecodeError):
        return [f"{path}: not read: {answer.reason}"]
    found = answer["matches"]
    copies = [m for m in found if m["score"] >= answer["threshold"]]
    then = "" if copies else "; best match:" if found else "; the index has no live reference"
    lines = [f"{path}: {'copy' if answer['is_copy'] else 'not a copy'} ({answer['version']}, is-copy threshold "
             f"{answer['threshold']:.4f}){then}"]
    for m in copies or found[:1]:
        q = "-" if m["q_value"] is None else f"{m['q_value']:.3f}"
        checked = {True: "verified", False: "not verified", None: "not checked"}[m["verified"]]
        inliers = f", {m['inliers']} inliers" if m["inliers"] is not None else ""
        file = where(m["reference_id"])
        lines.append(f"  {m['reference_id']}  score {m['score']:.4f}  q-value {q}  {checked}{inliers}"
                     + (f"  {file}" if file else ""))
    return lines


class WindowWorker:
    """One replica of the service's :class:`Matcher` that answers windows of images into ``out``."""

    def __init__(self, root: str, version: str, overrides: Sequence[str], out: str) -> None:
        self.matcher = Matcher(root, version, overrides)
        self.out = out

    def answer(self, name: str, files: list[ImageFile], progress: Callable[[int], object] | None = None) -> int:
        """Write window ``name``'s part and its unread files; returns its images less those counted by ``progress``."""
        answers, unread = match_window(self.matcher, files, progress)
        write_table(unread, join(self.out, ERRORS, name))  # first: a part marks its window done
        write_table(answers, join(self.out, PARTS, name))
        return 0 if progress else len(files)


def answer_windows(todo: list[tuple[str, list[ImageFile]]], root: str, version: str, overrides: Sequence[str],
                   out: str, cfg: PipelineConfig, address: str | None = None) -> None:
    """Answer the windows ``todo`` on ``serve.num_replicas`` workers (see the module docstring)."""
    resources = {"num_cpus": cfg.serve.num_cpus, "num_gpus": cfg.serve.num_gpus}
    args = (os.path.abspath(root), version, list(overrides), absolute(out))
    with tqdm(total=sum(len(files) for _, files in todo), desc="index match", unit="image", delay=BAR_DELAY) as bar:
        try:
            for images in on_workers(WindowWorker, args, "answer", todo, cfg.serve.num_replicas, resources, cfg.ray,
                                     address, gpus_setting="serve.num_gpus", progress=bar.update):
                bar.update(images)
        except WorkerFailed as e:
            raise RuntimeError(f"index match: a replica failed ({e}); the windows written are kept in "
                               f"{join(out, PARTS)}, so a re-run goes on from them") from None


def match_folder(root: str, folder: str, out: str, overrides: list[str] | None = None,
                 address: str | None = None) -> Matched:
    """Answer every image of ``folder`` from index ``root`` into ``out`` (see the module docstring)."""
    scan = scan_images(os.path.abspath(folder))
    check_unique_ids(scan, folder, "index match")
    if not scan.files:
        raise InputError(f"index match: {folder} has no image files ({len(scan.rejected)} other file(s))")
    started = read_settings(out)  # a re-run answers from the version the first one pinned
    version = started["version"] if started else IndexDir(root).require_current()
    _, cfg = index_config(root, version, overrides or [])  # bad overrides are refused before anything is written
    pin_answers(out, root, folder, version, scan.files)
    if started:
        log.info(f"index match: going on in {out} with version {version}, pinned when it was started")
    parts, errors = join(out, PARTS), join(out, ERRORS)
    windows = [(f"part-{i // WINDOW:05d}.parquet", scan.files[i:i + WINDOW]) for i in range(0, len(scan.files), WINDOW)]
    done = {os.path.basename(p) for p in list_shards(parts)}
    todo = [(name, files) for name, files in windows if name not in done]
    if todo:
        answer_windows(todo, root, version, overrides or [], out, cfg, address)
    listing = pa.Table.from_pylist([{"path": p, "error": f"{p}: {why}"} for p, why in scan.rejected],
                                   schema=ERRORS_SCHEMA)
    unread = pa.concat_tables([read_table(errors).cast(ERRORS_SCHEMA), listing])
    write_table(unread, join(out, "errors.parquet"))
    threshold = written(cfg.copy_threshold())
    kept: list[pa.Table] = []  # each part's copies, taken as matches.csv is written

    def answers() -> Iterator[pa.Table]:  # a window at a time: the driver never holds every answer
        for shard in list_shards(parts):
            part = read_table(shard)
            kept.append(copies(part, threshold))
            yield part
    write_predictions(answers(), join(out, "matches.csv"), EXTRA)
    found = copies(pa.concat_tables(kept), threshold)
    write_predictions(found, join(out, "copies.csv"), EXTRA)
    return Matched(len(scan.files), found.num_rows, unread.num_rows, threshold, version)
