"""Augmentation families: name -> ``fn(image, strength, rng, ctx) -> image``.

Every op draws all of its randomness from the ``rng`` it is given (never from ``random`` or
torch's global RNG), so a recipe is reproducible from its seed. ``strength`` in [0, 1] maps
linearly onto the op's own parameter range (written next to each op): 0 is the mildest edit,
1 the strongest this family is meant to produce.

Most families are a :class:`Family`: a draw of parameters for one named AugLy edit of
:data:`core.augment.edits.EDITS`, so detector synthesis and the sample builder apply the same
edits with their own draws. The rest use torchvision or PIL directly.

Example::

    rng = np.random.default_rng(0)
    out = OPS["pixelize"](photo, 0.5, rng, OpContext())
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from core.augment.assets import SCREENSHOT_TEMPLATES, emoji_names
from core.augment.edits import EDITS
from core.augment.registry import registrar


@dataclass(frozen=True)
class OpContext:
    """What an op may need besides the image: other photos to paste onto (paths or images)."""

    backgrounds: Sequence[Image.Image | str | os.PathLike] = field(default_factory=tuple)


Op = Callable[[Image.Image, float, np.random.Generator, OpContext], Image.Image]
# What a family draws: the image to edit (usually the input) and the edit's keyword parameters.
Draw = Callable[[Image.Image, float, np.random.Generator, OpContext], tuple[Image.Image, dict[str, Any]]]
OPS: dict[str, Op] = {}
register_op = registrar(OPS, "augmentation op")  # decorator: @register_op(name)
AUGLY_FONTS = ("Raleway-ExtraBold.ttf", "Chunkfive.ttf", "CaviarDreams.ttf", "Allura-Regular.ttf")
MEME_MIN_WIDTH = 256  # px; narrower photos are upscaled so that a caption always fits
MEME_MIN_CAPTION = 40  # px; AugLy starts at caption - 10 and shrinks the font by 5 until the text fits


@dataclass(frozen=True)
class Family:
    """An op that draws the parameters of the edit ``EDITS[edit]`` and applies it."""

    edit: str
    draw: Draw

    def __call__(self, img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
        image, params = self.draw(img, s, rng, ctx)
        return EDITS[self.edit](image, **params)


FAMILIES: dict[str, Family] = {}


def register_family(name: str, edit: str | None = None) -> Callable[[Draw], Draw]:
    """Decorator: register a draw as op ``name`` applying edit ``edit`` (default: ``name``)."""

    def deco(draw: Draw) -> Draw:
        if (edit or name) not in EDITS:
            raise ValueError(f"family {name!r}: no edit {edit or name!r}")
        FAMILIES[name] = register_op(name)(Family(edit or name, draw))
        return draw

    return deco


def _lerp(lo: float, hi: float, s: float) -> float:
    return lo + (hi - lo) * s


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _words(rng: np.random.Generator, n: int) -> str:
    letters = np.array(list(string.ascii_uppercase + string.ascii_lowercase))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n))


def _load(item: Image.Image | str | os.PathLike) -> Image.Image:
    return item if isinstance(item, Image.Image) else Image.open(item).convert("RGB")


# --- AugLy overlays ---------------------------------------------------------------------

@register_family("overlay_text")
def overlay_text(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                 ) -> tuple[Image.Image, dict[str, Any]]:
    """Random glyph strings; font size 0.05..0.3 of the height, opacity 0.5..1."""
    lines = [[int(c) for c in rng.integers(0, 60, rng.integers(3, 12))] for _ in range(rng.integers(1, 3))]
    return img, {"text": lines, "font": AUGLY_FONTS[rng.integers(len(AUGLY_FONTS))],
                 "font_size": _lerp(0.05, 0.3, s), "opacity": float(rng.uniform(0.5, 1.0)),
                 "color": _colour(rng), "x_pos": float(rng.uniform(0, 0.6)), "y_pos": float(rng.uniform(0, 0.8))}


@register_family("overlay_emoji")
def overlay_emoji(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                  ) -> tuple[Image.Image, dict[str, Any]]:
    """One emoji of any group; size 0.1..0.5 of the height, anywhere in the image."""
    names = emoji_names()
    size = _lerp(0.1, 0.5, s)
    return img, {"emoji": names[rng.integers(len(names))], "opacity": float(rng.uniform(0.6, 1.0)),
                 "emoji_size": size, "x_pos": float(rng.uniform(0, 1 - size)),
                 "y_pos": float(rng.uniform(0, 1 - size))}


@register_family("overlay_stripes")
def overlay_stripes(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                    ) -> tuple[Image.Image, dict[str, Any]]:
    """Stripes; opacity 0.2..0.9 and density 0.1..0.7."""
    return img, {"line_width": float(rng.uniform(0.1, 0.6)), "line_color": _colour(rng),
                 "line_angle": float(rng.uniform(-90, 90)), "line_density": _lerp(0.1, 0.7, s),
                 "line_type": ("solid", "dotted", "dashed")[rng.integers(3)], "line_opacity": _lerp(0.2, 0.9, s)}


@register_family("meme_format")
def meme_format(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                ) -> tuple[Image.Image, dict[str, Any]]:
    """Caption bar above the photo; its height 0.15..0.5 of the photo's."""
    if img.width < MEME_MIN_WIDTH:  # AugLy shrinks the font until the caption fits, past 0 px
        img = img.resize((MEME_MIN_WIDTH, max(1, img.height * MEME_MIN_WIDTH // img.width)))
    caption = max(MEME_MIN_CAPTION, int(img.height * _lerp(0.15, 0.5, s)))
    font = AUGLY_FONTS[rng.integers(2)]  # two bold fonts
    return img, {"text": _words(rng, int(rng.integers(1, 4))), "font": font, "caption_height": caption,
                 "text_color": _colour(rng), "meme_bg_color": _colour(rng)}


@register_family("screenshot", "overlay_onto_screenshot")
def screenshot(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
               ) -> tuple[Image.Image, dict[str, Any]]:
    """The photo inside a web/mobile screenshot template; strong = cropped to fit."""
    return img, {"template": SCREENSHOT_TEMPLATES[rng.integers(len(SCREENSHOT_TEMPLATES))],
                 "crop_src_to_fit": bool(rng.random() < s)}


@register_family("paste_onto_background", "overlay_image")
def paste_onto_background(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                          ) -> tuple[Image.Image, dict[str, Any]]:
    """The photo pasted onto another photo; it covers 0.9..0.35 of the height.

    Without context backgrounds the canvas is a random flat colour.
    """
    if ctx.backgrounds:
        canvas = _load(ctx.backgrounds[rng.integers(len(ctx.backgrounds))])
    else:
        canvas = Image.new("RGB", img.size, _colour(rng))
    size = _lerp(0.9, 0.35, s)
    return canvas, {"overlay": img, "opacity": 1.0, "overlay_size": size, "max_visible_opacity": 1.0,
                    "x_pos": float(rng.uniform(0, 1 - size)), "y_pos": float(rng.uniform(0, 1 - size))}


# --- AugLy quality and geometry ---------------------------------------------------------

@register_family("pixelize", "pixelization")
def pixelize(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
             ) -> tuple[Image.Image, dict[str, Any]]:
    """Pixelisation ratio 0.9..0.15 (fraction of resolution kept)."""
    return img, {"ratio": _lerp(0.9, 0.15, s)}


@register_family("jpeg", "encoding_quality")
def jpeg(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
         ) -> tuple[Image.Image, dict[str, Any]]:
    """JPEG re-encoding at quality 90..8."""
    return img, {"quality": int(round(_lerp(90, 8, s)))}


@register_family("blur")
def blur(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
         ) -> tuple[Image.Image, dict[str, Any]]:
    """Gaussian blur, radius 0.2..2 % of the shorter side."""
    return img, {"radius": min(img.size) * _lerp(0.002, 0.02, s)}


@register_family("downscale", "scale")
def downscale(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
              ) -> tuple[Image.Image, dict[str, Any]]:
    """Both sides times 0.8..0.15 (a thumbnail), never below 16 px."""
    return img, {"factor": max(_lerp(0.8, 0.15, s), 16 / min(img.size))}


@register_family("noise", "random_noise")
def noise(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
          ) -> tuple[Image.Image, dict[str, Any]]:
    """Gaussian noise of variance 0.002..0.05 (pixel values in [0, 1])."""
    return img, {"mean": 0.0, "var": _lerp(0.002, 0.05, s), "seed": int(rng.integers(2**31))}


@register_family("pad")
def pad(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
        ) -> tuple[Image.Image, dict[str, Any]]:
    """A plain border of 0.05..0.6 of the width (and, drawn apart, of the height) on each side."""
    w, h = (_lerp(0.05, 0.6, s) * float(rng.uniform(0.5, 1.0)) for _ in range(2))
    return img, {"w_factor": w, "h_factor": h, "color": tuple(int(c) for c in rng.integers(0, 256, 3))}


@register_family("crop")
def crop(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
         ) -> tuple[Image.Image, dict[str, Any]]:
    """Random crop keeping 0.95..0.4 of each side."""
    w, h = (_lerp(0.95, 0.4, s) * float(rng.uniform(0.85, 1.15)) for _ in range(2))
    w, h = min(w, 1.0), min(h, 1.0)
    x, y = float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h))
    return img, {"x1": x, "y1": y, "x2": x + w, "y2": y + h}


@register_family("hflip")
def hflip(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
          ) -> tuple[Image.Image, dict[str, Any]]:
    """Mirror left-right (strength unused)."""
    return img, {}


@register_family("vflip")
def vflip(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
          ) -> tuple[Image.Image, dict[str, Any]]:
    """Mirror top-bottom (strength unused)."""
    return img, {}


@register_family("rotate")
def rotate(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
           ) -> tuple[Image.Image, dict[str, Any]]:
    """Rotation by up to +-5..45 degrees (AugLy crops the black corners)."""
    return img, {"degrees": float(rng.uniform(-1, 1)) * _lerp(5, 45, s)}


@register_family("colour", "color_jitter")
def colour(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
           ) -> tuple[Image.Image, dict[str, Any]]:
    """Brightness/contrast change of up to +-5..60 %, saturation 0.95..0 to 1.05..2."""
    def factor(span: float) -> float:
        return float(1 + rng.uniform(-1, 1) * span)

    return img, {"brightness_factor": factor(_lerp(0.05, 0.6, s)), "contrast_factor": factor(_lerp(0.05, 0.6, s)),
                 "saturation_factor": factor(_lerp(0.05, 1.0, s))}


@register_family("perspective", "perspective_transform")
def perspective(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext
                ) -> tuple[Image.Image, dict[str, Any]]:
    """Perspective warp; corner jitter sigma 1..12 % of the shorter side."""
    return img, {"sigma": min(img.size) * _lerp(0.01, 0.12, s), "seed": int(rng.integers(2**31)),
                 "crop_out_black_border": True}


@register_op("rotate90")
def rotate90(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Rotation by 90, 180 or 270 degrees (PIL; strength unused)."""
    return img.rotate(90 * int(rng.integers(1, 4)), expand=True)


# --- torchvision ------------------------------------------------------------------------

@register_op("tv_hue")
def tv_hue(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Hue shift of up to +-0.02..0.5 (torchvision)."""
    return TF.adjust_hue(img, float(rng.uniform(-1, 1)) * _lerp(0.02, 0.5, s))


@register_op("tv_grayscale")
def tv_grayscale(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Grey image with 3 channels (torchvision; strength unused)."""
    return TF.rgb_to_grayscale(img, num_output_channels=3)


@register_op("tv_posterize")
def tv_posterize(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Keep 7..2 bits per channel (torchvision)."""
    return TF.posterize(img, int(round(_lerp(7, 2, s))))


@register_op("tv_affine")
def tv_affine(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Shear up to 2..25 degrees and shift up to 2..15 % (torchvision)."""
    shift = _lerp(0.02, 0.15, s)
    dx, dy = (int(v * shift * side) for v, side in zip(rng.uniform(-1, 1, 2), img.size))
    shear = [float(v) * _lerp(2, 25, s) for v in rng.uniform(-1, 1, 2)]
    return TF.affine(img, angle=0.0, translate=[dx, dy], scale=1.0, shear=shear)


@register_op("tv_erase")
def tv_erase(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """A random-colour rectangle over 2..25 % of the area (torchvision erase)."""
    x = TF.pil_to_tensor(img)
    _, h, w = x.shape
    side = np.sqrt(_lerp(0.02, 0.25, s))
    eh, ew = max(1, int(h * side)), max(1, int(w * side))
    i, j = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    fill = torch.tensor(_colour(rng), dtype=x.dtype)[:, None, None]
    return TF.to_pil_image(TF.erase(x, i, j, eh, ew, fill))
