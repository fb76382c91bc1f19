"""Awkward input files for decoder and pipeline tests, with the outcome each one must have.

``make_bad_images(folder)`` writes the files listed in :data:`EXPECTED` and returns
``{name: path}``. For each name, ``EXPECTED[name]`` says:

- ``error``: True if :func:`core.imageio.load_rgb` must raise ``ImageDecodeError``
  (and the pipeline must list the file in ``errors.parquet``);
- ``reason``: a substring of that error message (None when the file must load);
- ``size``: ``(width, height)`` after decoding, EXIF orientation applied (None for errors).

Files (all small, content fixed, so repeated calls write identical bytes):

| name         | file              | content                                   | outcome                  |
|--------------|-------------------|-------------------------------------------|--------------------------|
| truncated    | bad_truncated.jpg | a valid JPEG cut to 60% of its bytes      | error "truncated image"  |
| empty        | bad_empty.jpg     | zero bytes                                | error "empty file"       |
| text         | bad_text.jpg      | a text file with a .jpg name              | error "not an image"     |
| cmyk         | ok_cmyk.jpg       | CMYK JPEG, left half cyan, right white    | loads, 80x60             |
| gray16       | ok_gray16.png     | 16-bit grey PNG, 0..65535 left to right   | loads, 128x32, 0..255    |
| float01      | ok_float01.tif    | float TIFF (mode F), grey_ramp / 255      | loads, 64x16, the ramp   |
| int32        | ok_int32.tif      | 32-bit integer TIFF (mode I), the ramp    | loads, 64x16, the ramp   |
| exif_rotated | ok_exif_rot.jpg   | stored 80x48, red top-left, orientation 6 | loads, 48x80, red top-right |
| good         | ok_plain.jpg      | ordinary RGB JPEG                         | loads, 96x72             |
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RED = (255, 0, 0)
CORNER = 16  # side of the coloured square in the EXIF test image

EXPECTED: dict[str, dict] = {
    "truncated": {"file": "bad_truncated.jpg", "error": True, "reason": "truncated image", "size": None},
    "empty": {"file": "bad_empty.jpg", "error": True, "reason": "empty file", "size": None},
    "text": {"file": "bad_text.jpg", "error": True, "reason": "not an image", "size": None},
    "cmyk": {"file": "ok_cmyk.jpg", "error": False, "reason": None, "size": (80, 60)},
    "gray16": {"file": "ok_gray16.png", "error": False, "reason": None, "size": (128, 32)},
    "float01": {"file": "ok_float01.tif", "error": False, "reason": None, "size": (64, 16)},
    "int32": {"file": "ok_int32.tif", "error": False, "reason": None, "size": (64, 16)},
    "exif_rotated": {"file": "ok_exif_rot.jpg", "error": False, "reason": None, "size": (48, 80)},
    "good": {"file": "ok_plain.jpg", "error": False, "reason": None, "size": (96, 72)},
}


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with a few discs: compresses like a photo, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = 40 + 150 * x * rng.uniform(0.3, 1, 3) + 60 * y * rng.uniform(0.3, 1, 3)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 12)), int(rng.integers(0, height - 12))
        draw.ellipse([x0, y0, x0 + 12, y0 + 12], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _cmyk() -> Image.Image:
    img = Image.new("CMYK", EXPECTED["cmyk"]["size"], (0, 0, 0, 0))  # no ink: white
    img.paste((255, 0, 0, 0), (0, 0, img.width // 2, img.height))   # full cyan: (0, 255, 255)
    return img


def _gray16() -> Image.Image:
    w, h = EXPECTED["gray16"]["size"]
    ramp = np.rint(np.linspace(0, 65535, w)).astype(np.uint16)
    return Image.fromarray(np.tile(ramp, (h, 1)))  # mode I;16


def grey_ramp(size: tuple[int, int]) -> np.ndarray:
    """The 8-bit grey ramp (0..255 left to right, ``size`` = width, height) that the float and
    integer TIFFs hold in their own number format: each must decode to exactly this."""
    w, h = size
    return np.tile(np.rint(np.linspace(0, 255, w)).astype(np.uint8), (h, 1))


def _exif_rotated() -> bytes:
    """Stored landscape 80x48 with a red top-left square; orientation 6 = display rotated 90° CW."""
    h, w = EXPECTED["exif_rotated"]["size"]  # stored size is the displayed size swapped
    img = Image.new("RGB", (w, h), (30, 60, 200))
    img.paste(RED, (0, 0, CORNER, CORNER))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(img, exif=exif.tobytes())


def make_bad_images(folder: Path) -> dict[str, Path]:
    """Write every file in :data:`EXPECTED` into ``folder``; returns ``{name: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes(_photo(*EXPECTED["good"]["size"], seed=1))
    content = {
        "truncated": good[: int(len(good) * 0.6)],
        "empty": b"",
        "text": b"This is not a JPEG, just text with a .jpg name.\n",
        "cmyk": _jpeg_bytes(_cmyk()),
        "exif_rotated": _exif_rotated(),
        "good": good,
    }
    paths = {name: folder / spec["file"] for name, spec in EXPECTED.items()}
    for name, data in content.items():
        paths[name].write_bytes(data)
    _gray16().save(paths["gray16"], "PNG")
    Image.fromarray(grey_ramp(EXPECTED["float01"]["size"]).astype(np.float32) / 255).save(paths["float01"])
    Image.fromarray(grey_ramp(EXPECTED["int32"]["size"]).astype(np.int32)).save(paths["int32"])
    return paths
