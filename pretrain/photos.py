"""Training photos as files: a compact list of (id, path), decoded one at a time on demand.

No process holds the training set: :class:`PhotoFiles` keeps ids and paths packed in two
numpy buffers (a few bytes per photo, and nothing for forked loader workers to copy on
access, unlike a list of Python strings), and :class:`LazyPhotos` decodes a photo only when
an item or a paste background needs it, through the pipeline's one decoder
(:func:`core.imageio.load_rgb`), shrunk to ``max_side``.

A file that fails to decode, or decodes too small or too thin for the recipes' edits, is never
fatal: it is logged once per process, naming the file and the reason, recorded in the run folder
(:class:`BadPhotos`, which the training loops count against ``data.max_bad_fraction``), and a
fixed replacement photo takes its place.

Example::

    files = PhotoFiles.from_folder("train/", limit=1000)
    photos = LazyPhotos(files, max_side=512)
    index, photo = photos.photo(17)    # photo 17, or its replacement if 17 does not decode
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image

from core.imageio import ImageDecodeError, image_size, list_images, load_rgb
from pretrain.recipes.recipe import RecipeError

log = logging.getLogger(__name__)
T = TypeVar("T")
REPLACEMENT_TRIES = 64  # photos tried in place of one that does not decode before giving up
MIN_SIDE = 32  # decoded shorter side below which a photo is replaced: some recipe ops fail on less
MAX_ASPECT = 10  # longer / shorter side above which a photo is replaced (a strip, not a photo)


@dataclass(frozen=True)
class Photo:
    """A decoded training photo and its id (file stem, as listed): the id seeds its augmentations."""

    image_id: str
    image: Image.Image


class PackedStrings:
    """An immutable list of strings in one byte buffer plus offsets (file-system encoding)."""

    def __init__(self, items: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(s) for s in items]
        self.offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.data[start:end].tobytes())

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def to_arrow(self) -> pa.Array:
        """The strings as an Arrow ``large_binary`` array over the same two buffers (file-system
        bytes: a name need not be valid UTF-8)."""
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(self), [None, pa.py_buffer(self.offsets),
                                                                               pa.py_buffer(self.data)])

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> PackedStrings:
        """The strings of a binary Arrow column, taken over from its buffers (no Python strings)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        arr = arr.cast(pa.large_binary())
        out = cls([])
        if len(arr):
            offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
            out.offsets = offsets - offsets[0]
            out.data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        return out


class PhotoFiles:
    """Photo ids and file paths, packed; item ``i`` is ``(image_id, path)``."""

    def __init__(self, ids: Iterable[str] | PackedStrings, paths: Iterable[str | os.PathLike] | PackedStrings) -> None:
        self.ids, self.paths = (x if isinstance(x, PackedStrings) else PackedStrings(x) for x in (ids, paths))
        if len(self.ids) != len(self.paths):
            raise ValueError(f"{len(self.ids)} ids for {len(self.paths)} paths")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, limit: int | None = None) -> PhotoFiles:
        """The image files under ``folder`` as :func:`core.imageio.list_images` lists them."""
        listing = list_images(folder, limit)
        if not listing:
            raise FileNotFoundError(f"{folder}: no training images in the folder")
        return cls((image_id for image_id, _ in listing), (path for _, path in listing))

    def to_table(self) -> pa.Table:
        """``image_id``, ``path`` (binary columns), one row per photo, in order."""
        return pa.table({"image_id": self.ids.to_arrow(), "path": self.paths.to_arrow()})

    @classmethod
    def from_table(cls, table: pa.Table) -> PhotoFiles:
        """The photos of a :meth:`to_table` table."""
        return cls(*(PackedStrings.from_arrow(table.column(c)) for c in ("image_id", "path")))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.ids[i], self.paths[i]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return zip(self.ids, self.paths)

    def take(self, indices: Sequence[int] | np.ndarray) -> PhotoFiles:
        """The photos at ``indices``, in that order."""
        return PhotoFiles((self.ids[int(i)] for i in indices), (self.paths[int(i)] for i in indices))


def usable(img: Image.Image, path: str) -> Image.Image:
    """``img``, or an :class:`ImageDecodeError` naming ``path`` when it is too small or too thin to
    train on: the recipes' edits (text, overlays, crops) fail on a few pixels, always alike."""
    check_size(img.size, path)
    return img


def check_size(size: tuple[int, int], path: str) -> None:
    """:class:`ImageDecodeError` naming ``path`` when a photo of ``size`` (width, height) is too small
    or too thin to train on (see :func:`usable`)."""
    short, long = sorted(size)
    if short < MIN_SIDE or long > MAX_ASPECT * short:
        raise ImageDecodeError(path, f"{size[0]} x {size[1]} px is too small or too thin to train on "
                               f"(shorter side >= {MIN_SIDE}, aspect <= {MAX_ASPECT}:1)")


def load_usable(path: str, max_side: int) -> Image.Image:
    """Photo ``path`` shrunk to ``max_side``, judged :func:`usable` at its decoded size (read from
    the header, before any decode): a small ``max_side`` must not make a good photo bad."""
    check_size(image_size(path), path)
    return load_rgb(path, max_side)


class BadPhotos:
    """The photos a run could not use, recorded in ``folder``: one JSON-lines file per process
    (loader workers and ranks on other hosts append to their own), read back as a whole."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def add(self, path: str, reason: str) -> None:
        """Record ``path`` as it is now (size, mtime) and why it was replaced."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"path": path, "reason": reason, "stamp": _stamp(path)}) + "\n")

    def reasons(self) -> dict[str, str]:
        """Each recorded path that is still there as it was recorded (once, whichever process met
        it) and its reason: a photo deleted, repaired or replaced since no longer counts."""
        out: dict[str, str] = {}
        for part in sorted(self.folder.glob("*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line a killed process left half written
                    continue
                path, stamp = record["path"], _stamp(record["path"])
                if path not in out and stamp is not None and record.get("stamp") == stamp:
                    out[path] = record["reason"]
        return out


def _stamp(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of ``path`` (None when it is not there): a file changed since has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class LazyPhotos(Sequence[Image.Image]):
    """Photos of ``files`` decoded on access, longer side at most ``max_side``.

    As a sequence of images it serves as paste backgrounds (``OpContext.backgrounds``): the
    pixels a background contributes are decoded like the training photos themselves.
    """

    def __init__(self, files: PhotoFiles, max_side: int, record: BadPhotos | None = None) -> None:
        self.files, self.max_side, self.record = files, max_side, record
        self._bad: set[int] = set()  # per process: each bad file is decoded, logged and recorded once

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]  # int indices only
        return self.photo(i)[1].image

    def photo(self, i: int) -> tuple[int, Photo]:
        """``(index, photo)``: photo ``i``, or a replacement (fixed per ``i``) when ``i`` does not decode."""
        return self.edited(i, lambda _, photo: photo)

    def edited(self, i: int, edit: Callable[[int, Photo], T]) -> tuple[int, T]:
        """``(index, edit(index, photo))`` of photo ``i``, or of its fixed replacement when ``i`` does not
        decode, is too small or thin, or ``edit`` (recipe copies) fails on it. A recipe's edits
        depend on (seed, photo, epoch) only, so a photo that failed would fail on every retry."""
        for j in self._candidates(i):
            if j in self._bad:
                continue
            image_id, path = self.files[j]
            try:
                return j, edit(j, Photo(image_id, load_usable(path, self.max_side)))
            except (ImageDecodeError, RecipeError) as e:
                self._bad.add(j)
                reason = e.reason if isinstance(e, ImageDecodeError) else str(e)
                log.warning("skipping training image %s: %s (a replacement photo is used)", path, reason)
                if self.record is not None:
                    self.record.add(path, reason)
        raise RuntimeError(
            f"training photo {self.files[i][1]} and {REPLACEMENT_TRIES} replacements do not decode or edit: "
            "is the training folder readable?")

    def _candidates(self, i: int) -> Iterator[int]:
        yield i
        yield from (int(j) for j in np.random.default_rng(i).integers(0, len(self), REPLACEMENT_TRIES))
