"""Where a living reference index keeps its versions, and how a new one is published.

::

    INDEX_DIR/
      CURRENT                    the published version's name (replaced by one atomic rename)
      .lock                      the one writer's lock, held while it publishes
      .staging.lock              held while a writer clears dead staging folders and claims its own
      staging/job-*/             what `index add` / `compact` make before they take the lock to publish
      blobs/<sha256><suffix>     model weight files by content hash, shared by every version
      versions/v000001/          one immutable version; it appears whole or not at all
        index.json               what it holds (see ensemble.index.versions)
        config.yaml              the pipeline config it was built with
        cards/<sha256>.json      the model cards it needs, weights pointing into blobs/
        images/part-*.parquet    the id map: image_id, path, sha256, width, height
        removed.parquet          tombstones: image ids taken down since the last compaction
        keys/<key>/ref-*.parquet reference patches (image_id, patch_id, embedding) of one shard
        keys/<key>/ref-*.faiss   that shard's faiss index
        keys/<key>/train.parquet the normalisation background (train/ descriptors)
        reduce/<key>.safetensors PCA/whitening, when the config has it

A writer builds its version under a hidden temp name (``core.store.atomic_dir``) and then
rewrites ``CURRENT``: a writer killed at any point leaves the previous version published and
whole. Unchanged files of the parent version are hard links, so adding or removing costs
what changes, not the size of the index. An add embeds its images, and a compaction rebuilds its
shards, in ``staging/`` without the writer's lock, so takedowns publish meanwhile; it then
publishes on top of them.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from core.imageio import sha256_file
from core.store import atomic_dir, copy_file, read_text, write_text

VERSION = re.compile(r"^v(\d{6})$")


class IndexFolderError(ValueError):
    """A missing, locked or inconsistent index folder (the message names it)."""


class Superseded(IndexFolderError):
    """Another writer published since this one read its version: its work is refused."""


def _locked(f: IO) -> bool:
    """Take ``f``'s flock (held until it is closed), or False when another open file holds it:
    unlike ``core.lock``'s, a second hold in the same process is refused too."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class IndexDir:
    """An index folder: its versions, the published one, and the writer's lock."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def versions(self) -> list[str]:
        """Finished versions, oldest first (hidden temp folders of killed writers are not versions)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if VERSION.match(p.name))

    def current(self) -> str | None:
        """The published version, or None for an index that has none yet."""
        path = self.root / "CURRENT"
        if not path.is_file():
            return None
        name = read_text(path).strip()
        if not VERSION.match(name) or not (self.versions_dir / name).is_dir():
            raise IndexFolderError(f"{path}: names {name!r}, which is not a version in {self.versions_dir}")
        return name

    def require_current(self) -> str:
        name = self.current()
        if name is None:
            raise IndexFolderError(f"{self.root}: not an index (no CURRENT); build one with `copydet index build`")
        return name

    def path(self, version: str) -> Path:
        return self.versions_dir / version

    def stale(self) -> list[Path]:
        """Temp folders left by writers that were killed before they published."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p for p in self.versions_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The one-writer lock (``INDEX_DIR/.lock``); a second writer fails at once, naming it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            if not _locked(f):
                raise IndexFolderError(f"{self.root}: another `copydet index` command is writing it (.lock)")
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def publish(self, parent: str | None = None,
                accept: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Path]]:
        """``(name, folder)`` of the next version to fill; when the block ends without error the
        folder is renamed into place and ``CURRENT`` switched to it, under the writer's lock.

        ``parent``: the version the new one is made from, read before the lock was taken. If another
        writer published since, the new version would drop its change: refused, nothing written,
        unless ``accept(now)`` says the writer can make it from the version ``now`` published."""
        with self.lock():
            now = self.current()
            if parent is not None and now != parent and not (accept and accept(now)):
                raise Superseded(f"{self.root}: another `copydet index` command published {now} after this one "
                                 f"read {parent}; nothing was written, run this command again")
            for tmp in self.stale():  # we hold the lock: no writer owns these any more
                shutil.rmtree(tmp, ignore_errors=True)
            done = self.versions()
            name = f"v{(int(VERSION.match(done[-1]).group(1)) if done else 0) + 1:06d}"
            with atomic_dir(self.path(name)) as tmp:
                yield name, tmp
            write_text(self.root / "CURRENT", name + "\n")

    @contextmanager
    def staging(self, name: str | None = None, of_version: bool = False) -> Iterator[Path]:
        """A folder of this writer's own under ``staging/``, removed when the block ends without
        error. Named (``job-<name>``, what its work is made from), it is kept otherwise, so a re-run
        goes on from it, unless ``of_version`` (the name says which version it was made from) and a
        newer one was published (:class:`Superseded`): a re-run works from that one, under another
        name. Unnamed, it is new and always removed. Other folders whose writer is gone are removed
        first."""
        base = self.root / "staging"
        base.mkdir(parents=True, exist_ok=True)
        folder = base / f"job-{name or uuid.uuid4().hex}"
        with open(self.root / ".staging.lock", "a") as claim:  # writers clear and claim one at a time: none
            fcntl.flock(claim, fcntl.LOCK_EX)                     # takes another's new folder for a dead one's
            for left in sorted(set(base.glob("job-*")) - {folder}):
                with suppress(FileNotFoundError), open(left / ".lock", "a") as f:  # gone: its writer just ended
                    if _locked(f):
                        shutil.rmtree(left, ignore_errors=True)
            folder.mkdir(exist_ok=True)
            f = open(folder / ".lock", "a")
            if not _locked(f):
                f.close()
                raise IndexFolderError(f"{folder}: another `copydet index` command works there (the same add?)")
        with f:
            try:
                yield folder
            except BaseException as e:
                if name is None or (of_version and isinstance(e, Superseded)):
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)

    def store_blob(self, path: str | os.PathLike) -> str:
        """Copy a weights file into ``blobs/`` by content hash (once); its path relative to the root."""
        rel = f"blobs/{sha256_file(path)}{Path(path).suffix}"
        if not (self.root / rel).is_file():
            copy_file(path, self.root / rel)
        return rel


def folder_bytes(path: Path, distinct: bool = False) -> int:
    """Bytes of the files under ``path``, a file that several versions link counted in each of them;
    with ``distinct``, once (what the folder takes on disk)."""
    sizes = {}
    for i, p in enumerate(p for p in path.rglob("*") if p.is_file()):
        st = p.stat()
        sizes[(st.st_dev, st.st_ino) if distinct else i] = st.st_size
    return sum(sizes.values())
