"""Decode any input photo to an upright 8-bit RGB image, or fail with a clear error.

Every pipeline stage opens images through :func:`load_rgb`, so all of them agree on size
(after EXIF orientation), colour (CMYK, 16-bit, 32-bit integer, float, palette and alpha handled
the same way) and on which files are bad. Bad files raise :class:`ImageDecodeError` naming the
file and the reason; the manifest stage records them in ``errors.parquet`` instead of crashing.

Pixels are always fully decoded (``Image.load``) and PIL's ``LOAD_TRUNCATED_IMAGES`` is left
as it is (False by default), so a truncated file fails here rather than yielding a grey
half-image. :func:`scan_images` lists an image folder so that every file under it is either
an image to decode or a rejected path with its reason.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Accepted image file extensions, in any letter case (README: "What copydet refuses").
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DRAFT_SCALES = (1, 2, 4, 8)  # the size reductions a JPEG decoder offers (DCT scaling)
WHITE = (255, 255, 255)
# Pillow refuses an image over twice this at open, before a JPEG could be decoded at reduced size:
# its check is replaced by ``max_pixels`` (this cap when none is given), applied after the draft.
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
# EXIF orientations (tag 0x0112) that rotate by 90 or 270 degrees, i.e. swap width and height.
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """A file that cannot be decoded into an image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason

    def __reduce__(self) -> tuple:  # rebuilt from both arguments when a Ray task raises it
        return type(self), (self.path, self.reason)


def _on_white(img: Image.Image) -> Image.Image:
    """Flatten transparency (RGBA, LA, palette with transparency, ...) onto white."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")


def _grey(img: Image.Image) -> Image.Image:
    """Integer or float grey (modes in :data:`GREY_RANGES`) to 8-bit RGB by a rule that fits the
    data; ``convert("RGB")`` would clip floats in 0..1 to black and 16-bit values to white.

    The first range 0..top of the mode that holds every pixel is scaled to 0..255; an image that
    fits none is stretched from its own min to max (a constant one becomes black).
    """
    arr = np.array(img, dtype=np.float32)  # one float32 copy, changed in place: 4 bytes a pixel at most
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # NaN / inf have no grey level
    low, high = float(arr.min()), float(arr.max())
    top = next((t for t in GREY_RANGES[img.mode] if low >= 0 and high <= t), None)
    if top is None:
        arr -= low
        top = (high - low) or 1.0
    arr *= 255 / top
    return Image.fromarray(np.rint(arr, out=arr).astype(np.uint8), "L").convert("RGB")


def _convert(img: Image.Image) -> Image.Image:
    """Pillow's own conversion: right for RGB, L, 1, CMYK, YCbCr, RGBX, ..."""
    return img.convert("RGB")


# Mode -> the ranges 0..top its pixels are read in, tried in order (see ``_grey``).
GREY_RANGES: dict[str, tuple[float, ...]] = {
    **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), (65535.0,)),  # 16-bit PNG/TIFF: always / 257
    "I": (255.0, 65535.0),  # 32-bit integers: 8-bit data as it is, else 16-bit data / 257
    "F": (1.0, 255.0),  # floats: 0..1 (the usual) times 255, else 8-bit data as it is
}
# Mode -> converter to RGB for the modes Pillow's ``convert("RGB")`` gets wrong; others use ``_convert``.
TO_RGB: dict[str, Callable[[Image.Image], Image.Image]] = {
    **dict.fromkeys(GREY_RANGES, _grey),
    **{mode: _on_white for mode in ("RGBA", "RGBa", "LA", "La", "PA", "P")},
}


def _reason(err: Exception) -> str:
    """A short, stable description of why decoding failed (the original message in brackets)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(err, Image.DecompressionBombError):
        return f"too many pixels ({err})"
    if isinstance(err, OSError) and "truncated" in str(err).lower():
        return f"truncated image ({err})"
    return f"decode failed ({type(err).__name__}: {err})"


def _check_readable(path: str | os.PathLike) -> None:
    """Fail early and clearly on missing, unreadable or empty files."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e.strerror})") from e
    if size == 0:
        raise ImageDecodeError(path, "empty file")


def _reduction(size: tuple[int, int], draft_side: int | None, max_pixels: int | None) -> int:
    """The JPEG scale-down (1, 2, 4 or 8) that keeps the longer side >= ``draft_side`` and, where
    possible, the pixel count <= ``max_pixels`` (the cap wins when both cannot hold)."""
    w, h = size
    need = draft_side or max(w, h)
    fits = [s for s in DRAFT_SCALES if min(w, h) >= s]  # at least a pixel a side (a 1 x 1 JPEG stays 1)
    s = max(s for s in fits if s == 1 or math.ceil(max(w, h) / s) >= need)
    while max_pixels and math.ceil(w / s) * math.ceil(h / s) > max_pixels and s < fits[-1]:
        s *= 2
    return s


def _draft(img: Image.Image, path: str | os.PathLike, draft_side: int | None, max_pixels: int | None) -> None:
    """Let a JPEG decoder scale down by 1/2, 1/4 or 1/8 (a no-op for other formats): a 4000 px
    photo wanted at 512 px decodes ~16x fewer pixels. Refuses an image that still has more than
    ``max_pixels`` pixels, before any pixel is decoded."""
    s = _reduction(img.size, draft_side, max_pixels)
    if s > 1:
        img.draft(img.mode, (img.width // s, img.height // s))
    if max_pixels and img.width * img.height > max_pixels:
        raise ImageDecodeError(path, f"too many pixels ({img.width}x{img.height} = {img.width * img.height:,}; "
                                     f"the cap max_pixels is {max_pixels:,})")


def load_rgb(path: str | os.PathLike, max_side: int | None = None, *, draft_side: int | None = None,
             max_pixels: int | None = None) -> Image.Image:
    """Fully decode ``path`` as an upright 8-bit RGB image (EXIF orientation applied).

    With ``max_side``, the image is shrunk (aspect kept, bilinear) so that its longer side is
    at most ``max_side``. JPEGs are decoded at reduced size (draft mode) while their longer side
    stays >= ``max_side`` or ``draft_side`` (``draft_side`` alone resamples nothing), and while
    they have more than ``max_pixels`` pixels; any other image over ``max_pixels`` is refused
    before it is decoded. Raises :class:`ImageDecodeError` for every kind of bad input:
    missing/empty file, not an image, too many pixels, truncated or corrupt data.
    """
    _check_readable(path)
    return _decode(path, path, max_side, draft_side, max_pixels)


def decode_rgb(data: bytes, name: str = "upload", max_side: int | None = None,
               max_pixels: int | None = None, *, draft_side: int | None = None) -> Image.Image:
    """:func:`load_rgb` for bytes in memory (an upload); errors name ``name``.

    ``max_pixels`` refuses images whose header declares more pixels (a decompression bomb)
    before any pixel is decoded.
    """
    if not data:
        raise ImageDecodeError(name, "empty file")
    return _decode(io.BytesIO(data), name, max_side, draft_side, max_pixels)


def _decode(source: str | os.PathLike | BinaryIO, name: str | os.PathLike, max_side: int | None,
            draft_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    try:
        with Image.open(source) as img:
            _draft(img, name, max_side or draft_side, max_pixels or DEFAULT_MAX_PIXELS)
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = TO_RGB.get(upright.mode, _convert)(upright)
            if max_side is not None:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return rgb
    except ImageDecodeError:
        raise
    except Exception as e:  # the decoding boundary: any failure becomes a named, recorded error
        raise ImageDecodeError(name, _reason(e)) from e


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_rgb` returns it, read from the header only.

    Cheap (no pixel decode), so it does not detect truncated pixel data.
    """
    _check_readable(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as e:
        raise ImageDecodeError(path, _reason(e)) from e
    return (h, w) if orientation in SWAPPING_ORIENTATIONS else (w, h)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes (identifies exact duplicates and changed inputs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ImageFile:
    """One accepted file of an image folder: its id, resolved path, and what pins its content."""

    image_id: str  # path under the folder without the extension (ISC21: the file stem)
    path: str
    size: int
    mtime_ns: int


def file_list_hash(files: Sequence[ImageFile], more: str = "") -> str:
    """SHA-256 of a file list (paths, sizes, mtimes) and ``more``: what a resumed command's saved
    work was made from, so that it goes on only from the same files."""
    h = hashlib.sha256(more.encode())
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class FolderScan:
    """Every file under an image folder: accepted ``files`` (sorted) and ``rejected`` (path, reason)."""

    folder: str
    files: list[ImageFile] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def duplicates(self) -> dict[str, list[str]]:
        """id -> paths, for the ids that more than one file gives (``Q1.jpg`` and ``Q1.png``)."""
        by_id: dict[str, list[str]] = {}
        for f in self.files:
            by_id.setdefault(f.image_id, []).append(f.path)
        return {i: paths for i, paths in by_id.items() if len(paths) > 1}


def _stat_reason(path: Path, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if path.is_symlink() and err.errno == errno.ENOENT:
        return f"broken symlink (to {os.readlink(path)})"
    return f"cannot read ({err.strerror or err})"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 come back from the OS as lone surrogates
        return False
    return True


def _walk(folder: str, rel: str, ancestors: frozenset[str], scan: FolderScan) -> None:
    """Scan ``folder`` (``rel``: its path under the root, "" or ending in "/") into ``scan``. One
    stat per entry (DirEntry caches it); a file's resolved path is its resolved folder's plus its
    name unless it is a symlink (resolving every file took ~30 us of the ~33 a file cost)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        real_folder = os.path.realpath(folder)
    except OSError as e:
        scan.rejected.append((folder, f"cannot read folder ({e.strerror or e})"))
        return
    while entries:
        entry = entries.pop()  # in name order; let go once read: a DirEntry keeps its stat (~700 B a file)
        if not _utf8(entry.name):  # Arrow tables, CSVs and ids hold text: name it as its bytes read
            shown = os.fsencode(entry.path).decode("utf-8", "backslashreplace")
            scan.rejected.append((shown, "the name is not UTF-8 text (rename it)"))
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError as e:
            scan.rejected.append((entry.path, _stat_reason(Path(entry.path), e)))
            continue
        stem, suffix = os.path.splitext(entry.name)
        if stat.S_ISDIR(st.st_mode):
            real = os.path.realpath(entry.path)
            if real in ancestors:
                scan.rejected.append((entry.path, f"symlink loop (to {real}, a folder above it)"))
            else:
                _walk(entry.path, f"{rel}{entry.name}/", ancestors | {real}, scan)
        elif not stat.S_ISREG(st.st_mode):
            scan.rejected.append((entry.path, "not a regular file"))
        elif entry.name.lower() in IMAGE_SUFFIXES:  # ".jpg": splitext reads it as a stem, no extension
            scan.rejected.append((entry.path, "no name before the extension (its image id would be empty)"))
        elif suffix.lower() not in IMAGE_SUFFIXES:
            scan.rejected.append((entry.path, f"not an image file extension (accepted: {' '.join(IMAGE_SUFFIXES)})"))
        else:
            path = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
            scan.files.append(ImageFile(rel + stem, path, st.st_size, st.st_mtime_ns))


def scan_images(folder: str | os.PathLike) -> FolderScan:
    """Every file under ``folder`` (recursive, following symlinks): accepted image files, sorted by
    relative path, with ids as in :func:`list_images`; and rejected paths with the reason (an
    extension not in :data:`IMAGE_SUFFIXES`, a broken symlink, a symlink loop, an unreadable
    folder). Nothing under the folder is left out silently."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    scan = FolderScan(str(root))
    _walk(str(root), "", frozenset({os.path.realpath(root)}), scan)  # depth-first, names sorted: path order
    return scan


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """``(image_id, path)`` for the image files under ``folder`` (recursive, sorted).

    The id is the file stem, as in ISC21 (``Q00001.jpg`` -> ``Q00001``); files in
    sub-folders get their relative path without suffix so ids stay unique.
    """
    out = [(f.image_id, f.path) for f in scan_images(folder).files]
    return out[:limit] if limit else out
