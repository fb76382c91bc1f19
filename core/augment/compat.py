"""Make AugLy 1.0.0 run on Pillow >= 10 and NumPy >= 1.24.

AugLy 1.0.0 still calls two APIs that were removed since:

- ``meme_format`` measures its caption with ``FreeTypeFont.getsize_multiline`` (Pillow 10);
- ``perspective_transform`` builds its matrix with ``dtype=np.float`` (NumPy 1.24).

Rather than re-adding the removed names to Pillow and NumPy for the whole process (which
would hide the same mistakes in our own code), :func:`apply` gives only the affected AugLy
modules a stand-in for ``numpy`` / ``PIL.ImageFont`` that adds the missing name and forwards
everything else. It patches only what is missing, so calling it again is a no-op, and it
does nothing on library versions that still have the old names.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# AugLy modules whose code reads ``np.float``.
NP_FLOAT_USERS = ("augly.image.utils.utils", "augly.image.utils.bboxes")
# AugLy module whose code calls ``ImageFont.truetype(...).getsize_multiline``.
FONT_USER = "augly.image.functional"


def _extended(module: ModuleType, **extra: Any) -> ModuleType:
    """A stand-in for ``module`` holding ``extra`` and forwarding every other attribute to it."""
    proxy = ModuleType(module.__name__, module.__doc__)
    proxy.__dict__.update(extra)
    proxy.__getattr__ = lambda name: getattr(module, name)  # PEP 562: used for missing names
    return proxy


class CaptionFont(ImageFont.FreeTypeFont):
    """A FreeType font that still has Pillow 9's ``getsize_multiline``."""

    def getsize_multiline(self, text: str, direction: str | None = None, spacing: int = 4,
                          features: list[str] | None = None, language: str | None = None,
                          stroke_width: int = 0) -> tuple[int, int]:
        """``(width, height)`` of ``text`` as ``ImageDraw.multiline_text`` draws it from (0, 0).

        Measured with the same drawing code that renders the caption, so AugLy's centring
        and fit-to-band loop see the real extent of the text.
        """
        draw = ImageDraw.Draw(Image.new("L", (1, 1)))
        _, _, right, bottom = draw.multiline_textbbox(
            (0, 0), text, font=self, spacing=spacing, direction=direction, features=features,
            language=language, stroke_width=stroke_width)
        return int(right), int(bottom)


def _truetype(font: Any = None, size: float = 10, index: int = 0, encoding: str = "",
              layout_engine: int | None = None) -> CaptionFont:
    """``ImageFont.truetype`` for a font file path, returning a :class:`CaptionFont`."""
    return CaptionFont(font, size, index, encoding, layout_engine)


def apply() -> list[str]:
    """Patch the AugLy modules that need it; returns what was patched (empty when nothing was)."""
    patched = []
    for name in NP_FLOAT_USERS:
        module = importlib.import_module(name)
        if not hasattr(module.np, "float"):
            module.np = _extended(np, float=float)
            patched.append(f"{name}.np.float")
    functional = importlib.import_module(FONT_USER)
    if not hasattr(functional.ImageFont.FreeTypeFont, "getsize_multiline") \
            and functional.ImageFont.truetype is not _truetype:
        functional.ImageFont = _extended(ImageFont, truetype=_truetype)
        patched.append(f"{FONT_USER}.ImageFont.truetype")
    return patched


apply()
