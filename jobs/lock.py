"""One copydet process per run folder at a time (an OS file lock, via ``filelock``).

Two runs into one ``--out`` would interleave their shards and leave config.yaml saying one thing
while predictions.csv comes from the other; the second one is refused instead, naming the
holder. The lock is re-entrant in its process (``copydet run`` holds it over every stage) and is
released by the OS when the holder dies. Run folders given as URIs (``s3://``) cannot be locked.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from jobs.layout import RunDir

log = logging.getLogger(__name__)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder."""


def _write_owner(fd: int) -> None:
    """Record the holder in the lock file (read by the process that is refused)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)


@contextmanager
def locked(run: RunDir) -> Iterator[None]:
    """Hold ``run``'s lock for the block; :class:`RunFolderBusy` at once if another process has it."""
    if "://" in run.root:
        log.warning(f"{run.root}: a run folder URI cannot be locked; make sure no other run writes to it")
        yield
        return
    os.makedirs(run.root, exist_ok=True)
    lock = FileLock(run.lock, timeout=0, is_singleton=True, on_acquired=_write_owner)
    try:
        lock.acquire()
    except Timeout:
        with open(run.lock) as f:
            holder = f.read().strip() or "another process"
        raise RunFolderBusy(f"{run.root} is in use by {holder}; wait until it ends or run into another "
                            "folder (--out)") from None
    try:
        yield
    finally:
        lock.release()
