"""Folders of images -> manifest rows (and error rows for files that do not decode)."""
from __future__ import annotations

from core.imageio import ImageDecodeError, image_size, load_rgb, sha256_file


def manifest_row(image_id: str, path: str, split: str,
                 max_pixels: int | None = None) -> tuple[dict | None, dict | None]:
    """Decode one file fully: ``(row, None)`` or ``(None, error_row)``.

    A JPEG over ``max_pixels`` is checked at reduced size (draft); its row keeps its full size.
    """
    try:
        load_rgb(path, max_pixels=max_pixels)
        width, height = image_size(path)
    except ImageDecodeError as e:
        return None, {"path": path, "error": str(e)}
    row = {"image_id": image_id, "path": path, "split": split, "width": width,
           "height": height, "sha256": sha256_file(path)}
    return row, None
