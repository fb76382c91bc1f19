"""One copydet process per output folder at a time (an OS file lock, via ``filelock``).

Two processes writing one folder (a pipeline run, a training run) would interleave their files
and leave one's settings beside the other's results; the second one is refused instead, naming
the holder. The lock is re-entrant in its process (``copydet run`` holds it over every stage)
and is released by the OS when the holder dies; the next holder deletes the temp files a killed
writer left. Folders given as URIs (``s3://``) cannot be locked.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from filelock import FileLock, Timeout

from core.store import remove_temps

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder."""


def _write_owner(fd: int) -> None:
    """Record the holder in the lock file (read by the process that is refused)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)


@contextmanager
def folder_lock(folder: str, hint: str) -> Iterator[None]:
    """Hold ``folder/.lock`` for the block; :class:`FolderBusy` at once, ending with ``hint`` (what
    to do instead, if anything), if another process has it. A folder the block created and left
    empty is removed again."""
    if "://" in folder:
        log.warning(f"{folder}: a folder URI cannot be locked; make sure no other process writes to it")
        yield
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", folder)
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    lock = FileLock(path, timeout=0, is_singleton=True, on_acquired=_write_owner)
    try:
        lock.acquire()
    except Timeout:
        with open(path) as f:
            holder = f.read().strip() or "another process"
        raise FolderBusy(f"{folder} is in use by {holder}; wait until it ends{hint and ' or ' + hint}") from None
    try:
        if lock.lock_counter == 1:  # this process's first hold: no writer of the folder runs yet
            left = remove_temps(folder, LOCK_NAME)
            if left:
                log.info(f"{folder}: removed {len(left)} unfinished file(s) that a killed run left")
        yield
    finally:
        lock.release()
        if created and os.listdir(folder) == [LOCK_NAME]:  # refused before writing: leave no folder behind
            with suppress(OSError):
                os.remove(path)
                os.rmdir(folder)
