"""Named AugLy edits with explicit keyword parameters: name -> ``fn(image, **params) -> image``.

The only place that calls AugLy. Each edit is the AugLy function of the same name with
AugLy's parameter names and defaults, except that assets are named instead of given as paths
(``font``, ``emoji`` as ``"group/name.png"``, ``template``; see :mod:`core.augment.assets`)
and ``overlay_text`` needs its ``text``. A parameter set that a caller records can therefore
be replayed as ``EDITS[name](image, **params)``. Edits that translate nothing are AugLy's
functions as they are, generated from :data:`PLAIN_EDITS`. Edits return what AugLy returns
(mode included): callers that need RGB convert.

Example::

    out = EDITS["overlay_text"](photo, text=[10, 20, 30], font="Raleway-ExtraBold.ttf", font_size=0.2)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import augly.image.functional as augf
from PIL import Image

from core.augment import assets
from core.augment.registry import registrar

Edit = Callable[..., Image.Image]
Colour = Sequence[int]
Glyphs = Sequence[int] | Sequence[Sequence[int]]  # one line of glyph indices, or one per line
EDITS: dict[str, Edit] = {}
register_edit = registrar(EDITS, "edit")  # decorator: @register_edit(name)


def _lines(text: Glyphs) -> list[int] | list[list[int]]:
    """AugLy's text argument: plain lists of plain ints (it refuses tuples and NumPy ints)."""
    return [int(t) if isinstance(t, Integral) else [int(g) for g in t] for t in text]


# --- overlays ---------------------------------------------------------------------------

@register_edit("overlay_text")
def overlay_text(img: Image.Image, *, text: Glyphs, font: str = "NotoNaskhArabic-Regular.ttf",
                 font_size: float = 0.15, opacity: float = 1.0, color: Colour = (255, 0, 0), x_pos: float = 0.0,
                 y_pos: float = 0.5) -> Image.Image:
    """Glyphs of ``font`` (indices into its character table) at ``(x_pos, y_pos)``.

    ``text`` has no default: AugLy's is drawn from the global ``random`` at import time.
    """
    return augf.overlay_text(img, text=_lines(text), font_file=assets.font_path(font), font_size=font_size,
                             opacity=opacity, color=tuple(color), x_pos=x_pos, y_pos=y_pos)


@register_edit("overlay_emoji")
def overlay_emoji(img: Image.Image, *, emoji: str = "smileys/smiling_face_with_heart_eyes.png",
                  opacity: float = 1.0, emoji_size: float = 0.15, x_pos: float = 0.4,
                  y_pos: float = 0.8) -> Image.Image:
    """One twemoji (``"group/name.png"``), ``emoji_size`` of the height, at ``(x_pos, y_pos)``."""
    return augf.overlay_emoji(img, emoji_path=assets.emoji_path(emoji), opacity=opacity,
                              emoji_size=emoji_size, x_pos=x_pos, y_pos=y_pos)


@register_edit("overlay_stripes")
def overlay_stripes(img: Image.Image, *, line_width: float = 0.5, line_color: Colour = (255, 255, 255),
                    line_angle: float = 0, line_density: float = 0.5, line_type: str = "solid",
                    line_opacity: float = 1.0) -> Image.Image:
    """Parallel stripes (``line_type`` solid, dotted or dashed) across the image."""
    return augf.overlay_stripes(img, line_width=line_width, line_color=tuple(line_color), line_angle=line_angle,
                                line_density=line_density, line_type=line_type, line_opacity=line_opacity)


# --- layouts ----------------------------------------------------------------------------

@register_edit("meme_format")
def meme_format(img: Image.Image, *, text: str = "LOL", font: str = "Raleway-ExtraBold.ttf",
                opacity: float = 1.0, text_color: Colour = (0, 0, 0), caption_height: int = 250,
                meme_bg_color: Colour = (255, 255, 255)) -> Image.Image:
    """A caption band ``caption_height`` px high above the image (needs the compat shim)."""
    return augf.meme_format(img, text=text, font_file=assets.font_path(font), opacity=opacity,
                            text_color=tuple(text_color), caption_height=caption_height,
                            meme_bg_color=tuple(meme_bg_color))


@register_edit("overlay_onto_screenshot")
def overlay_onto_screenshot(img: Image.Image, *, template: str = "web.png",
                            crop_src_to_fit: bool = False) -> Image.Image:
    """The image inside a screenshot template (``"web.png"`` / ``"mobile.png"``)."""
    return augf.overlay_onto_screenshot(img, template_filepath=assets.screenshot_template_path(template),
                                        crop_src_to_fit=crop_src_to_fit)


# --- plain AugLy functions -------------------------------------------------------------

# Edits that are AugLy's function of the same name as it is, limited to these keyword
# parameters (AugLy's own names, types and defaults).
PLAIN_EDITS: dict[str, tuple[str, ...]] = {
    "overlay_image": ("overlay", "opacity", "overlay_size", "x_pos", "y_pos", "max_visible_opacity"),
    "pixelization": ("ratio",),  # down- then up-sampled, keeping ``ratio`` of the resolution
    "encoding_quality": ("quality",),  # JPEG re-encoded
    "blur": ("radius",),  # Gaussian blur, px
    "brightness": ("factor",),
    "color_jitter": ("brightness_factor", "contrast_factor", "saturation_factor"),
    "grayscale": ("mode",),  # luminosity or average; the output keeps the input's mode
    "crop": ("x1", "y1", "x2", "y2"),  # fractions of the width and height
    "hflip": (),
    "vflip": (),
    "rotate": ("degrees",),  # cropped to the largest rectangle without black corners
    "perspective_transform": ("sigma", "dx", "dy", "seed", "crop_out_black_border"),  # needs the compat shim
    "scale": ("factor",),  # both sides times ``factor``
    "random_noise": ("mean", "var", "seed"),  # Gaussian, on values in [0, 1]
    "pad": ("w_factor", "h_factor", "color"),  # a border of ``w_factor`` x width on each side, etc.
}


def _plain(name: str, params: tuple[str, ...]) -> Edit:
    """AugLy's ``name`` as an edit taking only the keyword parameters ``params``."""
    augly_fn = getattr(augf, name)
    theirs = inspect.signature(augly_fn).parameters
    signature = inspect.Signature(
        [inspect.Parameter("img", inspect.Parameter.POSITIONAL_ONLY, annotation=Image.Image)]
        + [theirs[p].replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params],
        return_annotation=Image.Image)

    def edit(img: Image.Image, /, **kwargs: Any) -> Image.Image:
        signature.bind(img, **kwargs)  # a wrong or misspelt parameter is an error, not ignored
        return augly_fn(img, **kwargs)

    edit.__name__ = edit.__qualname__ = name
    edit.__doc__ = f"AugLy's ``{name}`` with keyword parameters {', '.join(params) or '(none)'}."
    edit.__signature__ = signature
    return edit


for _name, _params in PLAIN_EDITS.items():
    register_edit(_name)(_plain(_name, _params))
