"""Per-photo arrays computed once per run and kept on disk, memory-mapped.

The learned verifier's training needs every training photo's region tokens (each photo is a
candidate of some copy) and its mined neighbours. At DISC21 scale the tokens are ~30 GB
(1M photos x 15 regions x 512 floats): they are written batch by batch into a ``.npy`` file and
read back memory-mapped, so a worker holds the rows its batches touch, not the array, and a
resumed or restarted run reuses the file instead of describing every photo again.

A file counts only with its sidecar (``<name>.json``), written last, naming what it was made
from (``key``); another key, or a file without its sidecar, is computed again. It is computed
into ``.<name>.partial``, whose progress file records the rows finished: a killed computation
(hours at DISC21 scale) goes on from there. One worker of a run computes it (rank 0); the
others wait for it and share it through the page cache.

Example::

    tokens = photo_array(run_dir / "tokens.npy", key, len(photos), lambda a, b: describe(a, b))
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.logs import ProgressLines
from core.store import write_text
from pretrain.photos import PhotoFiles


def files_key(files: PhotoFiles, *parts: object) -> str:
    """A hash of the photo list (ids and paths, in order) and ``parts`` (settings, model cards)."""
    h = hashlib.sha256()
    for packed in (files.ids, files.paths):
        h.update(packed.offsets.tobytes())
        h.update(packed.data.tobytes())
    h.update(json.dumps([str(p) for p in parts]).encode())
    return h.hexdigest()


def photo_array(path: Path, key: str, n: int, rows: Callable[[int, int], np.ndarray], batch: int = 256,
                compute: bool = True, poll_s: float = 5.0) -> np.ndarray:
    """The ``n x ...`` array whose rows ``start:stop`` are ``rows(start, stop)``, from ``path``
    when it was made with ``key``; else computed ``batch`` rows at a time into it. Read-only.
    A computation that was killed goes on from the rows it had finished (for the same key).
    With ``compute`` False (the other workers of a run) it waits for the one that computes it."""
    side = path.with_name(path.name + ".json")
    record = {"key": key, "rows": n}

    def ready() -> bool:
        try:
            return path.is_file() and json.loads(side.read_text()) == record
        except FileNotFoundError:  # not written yet, or being replaced
            return False

    if not compute:
        while not ready():
            time.sleep(poll_s)
    if ready():
        return np.load(path, mmap_mode="r")
    side.unlink(missing_ok=True)  # the file is replaced below: its old sidecar must not vouch for it
    partial, progress = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.partial.json")
    out, start = _resume(partial, progress, record)
    lines = ProgressLines(f"{path.name}: rows", n, start=start)
    for a in range(start, n, batch):
        b = min(a + batch, n)
        block = np.asarray(rows(a, b))
        if out is None:  # the first batch gives the row shape and type
            path.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(partial, "w+", block.dtype, (n, *block.shape[1:]))
        out[a:b] = block
        out.flush()
        write_text(progress, json.dumps({**record, "done": b}))  # rows before b are on disk
        lines.tick(b)
    del out
    os.replace(partial, path)
    progress.unlink()
    write_text(side, json.dumps(record))
    return np.load(path, mmap_mode="r")


def _resume(partial: Path, progress: Path, record: dict) -> tuple[np.memmap | None, int]:
    """The partial file of a killed computation of ``record``, open for writing, and the rows it
    finished; ``(None, 0)``, with any other partial file deleted, when there is none."""
    try:
        done = json.loads(progress.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        done = {}
    if {k: done.get(k) for k in record} == record and partial.is_file():
        return np.load(partial, mmap_mode="r+"), done["done"]
    partial.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    return None, 0
