"""The one AugLy op set, shared by training recipes, detector synthesis and the sample builder.

- :mod:`core.augment.edits`: ``EDITS``, AugLy edits by name with explicit keyword parameters
  and assets by name (:mod:`core.augment.assets`); the only module that calls AugLy.
- :mod:`core.augment.families`: ``OPS``, strength-driven families for recipes; most draw the
  parameters of one edit from ``(strength, rng)``.

The compatibility shim runs first: it patches AugLy 1.0.0 for current Pillow/NumPy before any
edit can call ``meme_format`` or ``perspective_transform``.
"""

from core.augment import compat  # noqa: F401  (must run before AugLy is used)
from core.augment.assets import SCREENSHOT_TEMPLATES, emoji_names
from core.augment.edits import EDITS, Edit, register_edit
from core.augment.families import (
    FAMILIES,
    OPS,
    Family,
    Op,
    OpContext,
    register_family,
    register_op,
)

__all__ = [
    "EDITS", "FAMILIES", "OPS", "SCREENSHOT_TEMPLATES", "Edit", "Family", "Op", "OpContext", "emoji_names",
    "register_edit", "register_family", "register_op",
]
