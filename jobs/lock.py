"""One copydet process per run folder (:func:`core.lock.folder_lock` on ``RunDir.root``), which
logs to the folder's ``copydet.log`` while it holds it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from core.lock import FolderBusy, folder_lock
from core.logs import log_to
from jobs.layout import RunDir

__all__ = ["FolderBusy", "locked"]


@contextmanager
def locked(run: RunDir, hint: str = "run into another folder (--out)") -> Iterator[None]:
    """Hold ``run``'s lock for the block, appending copydet's log lines to ``RUN/copydet.log``;
    :class:`FolderBusy` at once if another process has it (the error ends with ``hint``: what to do instead)."""
    with folder_lock(run.root, hint), log_to(run.log):
        yield
