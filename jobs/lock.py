"""One copydet process per run folder (:func:`core.lock.folder_lock` on ``RunDir.root``)."""
from __future__ import annotations

from contextlib import AbstractContextManager

from core.lock import FolderBusy, folder_lock
from jobs.layout import RunDir

__all__ = ["FolderBusy", "locked"]


def locked(run: RunDir, hint: str = "run into another folder (--out)") -> AbstractContextManager[None]:
    """Hold ``run``'s lock for the block; :class:`FolderBusy` at once if another process has it
    (the error ends with ``hint``: what to do instead)."""
    return folder_lock(run.root, hint)
