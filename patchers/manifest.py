"""Folders of images -> manifest rows (and error rows for files that do not decode)."""
from __future__ import annotations

from pathlib import Path

from patchers.imageio import ImageDecodeError, load_rgb, sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def scan_folder(folder: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
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


def describe(image_id: str, path: str, split: str) -> tuple[dict | None, dict | None]:
    """Decode one file fully: ``(manifest_row, None)`` or ``(None, error_row)``."""
    try:
        img = load_rgb(path)
    except ImageDecodeError as e:
        return None, {"path": path, "error": str(e)}
    row = {"image_id": image_id, "path": path, "split": split, "width": img.width,
           "height": img.height, "sha256": sha256_file(path)}
    return row, None
