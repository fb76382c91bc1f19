"""Folders of images -> manifest rows (and error rows for files that do not decode)."""
from __future__ import annotations

from core.imageio import ImageDecodeError, load_rgb, sha256_file


def describe(image_id: str, path: str, split: str) -> tuple[dict | None, dict | None]:
    """Decode one file fully: ``(manifest_row, None)`` or ``(None, error_row)``."""
    try:
        img = load_rgb(path)
    except ImageDecodeError as e:
        return None, {"path": path, "error": str(e)}
    row = {"image_id": image_id, "path": path, "split": split, "width": img.width,
           "height": img.height, "sha256": sha256_file(path)}
    return row, None
