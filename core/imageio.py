"""Decode any input photo to an upright 8-bit RGB image, or fail with a clear error.

Every pipeline stage opens images through :func:`load_rgb`, so all of them agree on size
(after EXIF orientation), colour (CMYK, 16-bit, palette and alpha handled the same way) and
on which files are bad. Bad files raise :class:`ImageDecodeError` naming the file and the
reason; the manifest stage records them in ``errors.parquet`` instead of crashing.

Pixels are always fully decoded (``Image.load``) and PIL's ``LOAD_TRUNCATED_IMAGES`` is left
as it is (False by default), so a truncated file fails here rather than yielding a grey
half-image.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
WHITE = (255, 255, 255)
# EXIF orientations (tag 0x0112) that rotate by 90 or 270 degrees, i.e. swap width and height.
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """A file that cannot be decoded into an image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def _on_white(img: Image.Image) -> Image.Image:
    """Flatten transparency (RGBA, LA, palette with transparency, ...) onto white."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")


def _sixteen_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (0..65535) to 8-bit RGB by scaling; ``convert("L")`` would clip to white.

    Pillow also reads 16-bit PNG/TIFF as mode ``I``, so ``I`` is taken as 16-bit too.
    """
    arr = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), "L").convert("RGB")


def _convert(img: Image.Image) -> Image.Image:
    """Pillow's own conversion: right for RGB, L, 1, CMYK, YCbCr, RGBX, ..."""
    return img.convert("RGB")


# Mode -> converter to RGB for the modes Pillow's ``convert("RGB")`` gets wrong; others use ``_convert``.
TO_RGB: dict[str, Callable[[Image.Image], Image.Image]] = {
    **{mode: _sixteen_bit for mode in ("I;16", "I;16L", "I;16B", "I;16N", "I")},
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


def _draft(img: Image.Image, max_side: int) -> None:
    """Let a JPEG decoder scale down by 1/2, 1/4 or 1/8 while the longer side stays >= ``max_side``
    (a no-op for other formats): a 4000 px photo wanted at 512 px decodes ~16x fewer pixels."""
    scale = max_side / max(img.size)
    if scale < 1:
        img.draft(img.mode, (max(1, int(img.width * scale)), max(1, int(img.height * scale))))


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Fully decode ``path`` as an upright 8-bit RGB image (EXIF orientation applied).

    With ``max_side``, the image is shrunk (aspect kept, bilinear) so that its longer side is
    at most ``max_side``; JPEGs are decoded at reduced size (draft mode) to save time and memory.
    Raises :class:`ImageDecodeError` for every kind of bad input: missing/empty file,
    not an image, truncated or corrupt data.
    """
    _check_readable(path)
    return _decode(path, path, max_side)


def decode_rgb(data: bytes, name: str = "upload", max_side: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """:func:`load_rgb` for bytes in memory (an upload); errors name ``name``.

    ``max_pixels`` refuses images whose header declares more pixels (a decompression bomb)
    before any pixel is decoded.
    """
    if not data:
        raise ImageDecodeError(name, "empty file")
    return _decode(io.BytesIO(data), name, max_side, max_pixels)


def _decode(source: str | os.PathLike | BinaryIO, name: str | os.PathLike, max_side: int | None,
            max_pixels: int | None = None) -> Image.Image:
    try:
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} = {img.width * img.height} pixels, the limit is {max_pixels}")
            if max_side is not None:
                _draft(img, max_side)
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = TO_RGB.get(upright.mode, _convert)(upright)
            if max_side is not None:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return rgb
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


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """``(image_id, path)`` for the image files under ``folder`` (recursive, sorted).

    The id is the file stem, as in ISC21 (``Q00001.jpg`` -> ``Q00001``); files in
    sub-folders get their relative path without suffix so ids stay unique.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out = [(str(p.relative_to(root).with_suffix("")), str(p.resolve())) for p in files]
    return out[:limit] if limit else out
