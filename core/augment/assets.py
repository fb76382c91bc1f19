"""AugLy's bundled assets by name: fonts, emoji (``"group/name.png"``), screenshot templates.

Callers name an asset the way they record it (``"Raleway-ExtraBold.ttf"``,
``"smileys/smiling_face_with_heart_eyes.png"``, ``"web.png"``); only this module knows where
AugLy keeps the files, so a recorded parameter set can be replayed on any install.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

from augly import utils as augly_utils

FONTS_DIR = Path(augly_utils.FONTS_DIR)
EMOJI_DIR = Path(augly_utils.EMOJI_DIR)  # one folder per twemoji group
SCREENSHOT_TEMPLATES_DIR = Path(augly_utils.SCREENSHOT_TEMPLATES_DIR)
SCREENSHOT_BBOXES = SCREENSHOT_TEMPLATES_DIR / "bboxes.json"  # template -> its photo box, px
SCREENSHOT_TEMPLATES = ("web.png", "mobile.png")


def _resolve(folder: Path, name: str, kind: str) -> str:
    """``folder / name`` as a string; a name that leaves ``folder`` or is missing is an error."""
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
        raise FileNotFoundError(f"no AugLy {kind} {name!r} in {folder}")
    return str(path)


def font_path(name: str) -> str:
    """The file of AugLy font ``name`` (e.g. ``"NotoSans-Regular.ttf"``)."""
    return _resolve(FONTS_DIR, name, "font")


def emoji_path(name: str) -> str:
    """The file of AugLy emoji ``name``, written ``"group/name.png"``."""
    return _resolve(EMOJI_DIR, name, "emoji")


def screenshot_template_path(name: str) -> str:
    """The file of AugLy screenshot template ``name`` (``"web.png"`` or ``"mobile.png"``)."""
    return _resolve(SCREENSHOT_TEMPLATES_DIR, name, "screenshot template")


@cache
def _group_emoji(group: str) -> tuple[str, ...]:
    return tuple(f"{group}/{p.name}" for p in (EMOJI_DIR / group).glob("*.png"))


def emoji_names(groups: Iterable[str] | None = None) -> tuple[str, ...]:
    """Emoji names (``"group/name.png"``) of ``groups`` (default: every group), sorted.

    Sorted as their paths sort, so that an index drawn into this list picks the same emoji
    on every install and in every caller.
    """
    if groups is None:
        groups = (p.name for p in EMOJI_DIR.iterdir() if p.is_dir())
    return tuple(sorted(name for group in groups for name in _group_emoji(group)))
