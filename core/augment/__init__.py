"""The one AugLy op set: edit families shared by training recipes, detector synthesis,
tuning splits and the bundled-sample builder.

The compatibility shim runs first: it patches AugLy 1.0.0 for current Pillow/NumPy before any
op can call ``meme_format`` or ``perspective_transform``.
"""

from core.augment import compat  # noqa: F401  (must run before AugLy is used)
from core.augment.ops import OPS, Op, OpContext, register_op

__all__ = ["OPS", "Op", "OpContext", "register_op"]
