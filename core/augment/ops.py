"""Augmentation families: name -> ``fn(image, strength, rng, ctx) -> image``.

Every op draws all of its randomness from the ``rng`` it is given (never from ``random`` or
torch's global RNG), so a recipe is reproducible from its seed. ``strength`` in [0, 1] maps
linearly onto the op's own parameter range (written next to each op): 0 is the mildest edit,
1 the strongest this family is meant to produce. AugLy families need the compat shim that
``core.augment`` imports first (meme_format, perspective_transform).

Example::

    rng = np.random.default_rng(0)
    out = OPS["pixelize"](photo, 0.5, rng, OpContext())
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import augly.image.functional as augf
import augly.utils as augly_utils
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image


@dataclass(frozen=True)
class OpContext:
    """What an op may need besides the image: other photos to paste onto (paths or images)."""

    backgrounds: Sequence[Image.Image | str | os.PathLike] = field(default_factory=tuple)


Op = Callable[[Image.Image, float, np.random.Generator, OpContext], Image.Image]
OPS: dict[str, Op] = {}
AUGLY_FONTS = ("Raleway-ExtraBold.ttf", "Chunkfive.ttf", "CaviarDreams.ttf", "Allura-Regular.ttf")
SCREENSHOT_TEMPLATES = ("web.png", "mobile.png")
MEME_MIN_WIDTH = 256  # px; narrower photos are upscaled so that a caption always fits
MEME_MIN_CAPTION = 40  # px; AugLy starts at caption - 10 and shrinks the font by 5 until the text fits


def register_op(name: str) -> Callable[[Op], Op]:
    """Decorator: register an augmentation family under ``name``."""

    def deco(fn: Op) -> Op:
        if name in OPS:
            raise ValueError(f"augmentation op {name!r} is already registered")
        OPS[name] = fn
        return fn

    return deco


def _lerp(lo: float, hi: float, s: float) -> float:
    return lo + (hi - lo) * s


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _words(rng: np.random.Generator, n: int) -> str:
    letters = np.array(list(string.ascii_uppercase + string.ascii_lowercase))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n))


@cache
def _emoji_files() -> tuple[str, ...]:
    root = Path(augly_utils.SMILEY_EMOJI_DIR).parent  # every twemoji category
    return tuple(sorted(str(p) for p in root.rglob("*.png")))


def _load(item: Image.Image | str | os.PathLike) -> Image.Image:
    return item if isinstance(item, Image.Image) else Image.open(item).convert("RGB")


# --- AugLy overlays ---------------------------------------------------------------------

@register_op("overlay_text")
def overlay_text(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Random glyph strings; font size 0.05..0.3 of the height, opacity 0.5..1."""
    lines = [[int(c) for c in rng.integers(0, 60, rng.integers(3, 12))] for _ in range(rng.integers(1, 3))]
    font = os.path.join(augly_utils.FONTS_DIR, AUGLY_FONTS[rng.integers(len(AUGLY_FONTS))])
    return augf.overlay_text(
        img, text=lines, font_file=font, font_size=_lerp(0.05, 0.3, s),
        opacity=float(rng.uniform(0.5, 1.0)), color=_colour(rng),
        x_pos=float(rng.uniform(0, 0.6)), y_pos=float(rng.uniform(0, 0.8)),
    )


@register_op("overlay_emoji")
def overlay_emoji(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """One emoji; size 0.1..0.5 of the height, anywhere in the image."""
    files = _emoji_files()
    size = _lerp(0.1, 0.5, s)
    return augf.overlay_emoji(
        img, emoji_path=files[rng.integers(len(files))], opacity=float(rng.uniform(0.6, 1.0)),
        emoji_size=size, x_pos=float(rng.uniform(0, 1 - size)), y_pos=float(rng.uniform(0, 1 - size)),
    )


@register_op("overlay_stripes")
def overlay_stripes(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Stripes; opacity 0.2..0.9 and density 0.1..0.7."""
    return augf.overlay_stripes(
        img, line_width=float(rng.uniform(0.1, 0.6)), line_color=_colour(rng),
        line_angle=float(rng.uniform(-90, 90)), line_density=_lerp(0.1, 0.7, s),
        line_type=("solid", "dotted", "dashed")[rng.integers(3)], line_opacity=_lerp(0.2, 0.9, s),
    )


@register_op("meme_format")
def meme_format(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Caption bar above the photo; its height 0.15..0.5 of the photo's."""
    if img.width < MEME_MIN_WIDTH:  # AugLy shrinks the font until the caption fits, past 0 px
        img = img.resize((MEME_MIN_WIDTH, max(1, img.height * MEME_MIN_WIDTH // img.width)))
    caption = max(MEME_MIN_CAPTION, int(img.height * _lerp(0.15, 0.5, s)))
    font = os.path.join(augly_utils.FONTS_DIR, AUGLY_FONTS[rng.integers(2)])  # two bold fonts
    return augf.meme_format(
        img, text=_words(rng, int(rng.integers(1, 4))), font_file=font, caption_height=caption,
        text_color=_colour(rng), meme_bg_color=_colour(rng),
    )


@register_op("screenshot")
def screenshot(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """The photo inside a web/mobile screenshot template; strong = cropped to fit."""
    template = SCREENSHOT_TEMPLATES[rng.integers(len(SCREENSHOT_TEMPLATES))]
    return augf.overlay_onto_screenshot(
        img, template_filepath=os.path.join(augly_utils.SCREENSHOT_TEMPLATES_DIR, template),
        crop_src_to_fit=bool(rng.random() < s),
    )


@register_op("paste_onto_background")
def paste_onto_background(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """The photo pasted onto another photo (AugLy overlay_image); it covers 0.9..0.35 of the height.

    Without context backgrounds the canvas is a random flat colour.
    """
    if ctx.backgrounds:
        canvas = _load(ctx.backgrounds[rng.integers(len(ctx.backgrounds))])
    else:
        canvas = Image.new("RGB", img.size, _colour(rng))
    size = _lerp(0.9, 0.35, s)
    return augf.overlay_image(
        canvas, overlay=img, opacity=1.0, overlay_size=size, max_visible_opacity=1.0,
        x_pos=float(rng.uniform(0, 1 - size)), y_pos=float(rng.uniform(0, 1 - size)),
    )


# --- AugLy quality and geometry ---------------------------------------------------------

@register_op("pixelize")
def pixelize(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Pixelisation ratio 0.9..0.15 (fraction of resolution kept)."""
    return augf.pixelization(img, ratio=_lerp(0.9, 0.15, s))


@register_op("jpeg")
def jpeg(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """JPEG re-encoding at quality 90..8."""
    return augf.encoding_quality(img, quality=int(round(_lerp(90, 8, s))))


@register_op("blur")
def blur(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Gaussian blur, radius 0.2..2 % of the shorter side."""
    return augf.blur(img, radius=min(img.size) * _lerp(0.002, 0.02, s))


@register_op("crop")
def crop(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Random crop keeping 0.95..0.4 of each side."""
    w, h = (_lerp(0.95, 0.4, s) * float(rng.uniform(0.85, 1.15)) for _ in range(2))
    w, h = min(w, 1.0), min(h, 1.0)
    x, y = float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h))
    return augf.crop(img, x1=x, y1=y, x2=x + w, y2=y + h)


@register_op("hflip")
def hflip(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Mirror left-right (strength unused)."""
    return augf.hflip(img)


@register_op("vflip")
def vflip(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Mirror top-bottom (strength unused)."""
    return augf.vflip(img)


@register_op("rotate")
def rotate(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Rotation by up to +-5..45 degrees (AugLy crops the black corners)."""
    return augf.rotate(img, degrees=float(rng.uniform(-1, 1)) * _lerp(5, 45, s))


@register_op("rotate90")
def rotate90(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Rotation by 90, 180 or 270 degrees (strength unused)."""
    return img.rotate(90 * int(rng.integers(1, 4)), expand=True)


@register_op("colour")
def colour(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Brightness/contrast change of up to +-5..60 %, saturation 0.95..0 to 1.05..2."""
    def factor(span: float) -> float:
        return float(1 + rng.uniform(-1, 1) * span)

    return augf.color_jitter(
        img, brightness_factor=factor(_lerp(0.05, 0.6, s)), contrast_factor=factor(_lerp(0.05, 0.6, s)),
        saturation_factor=factor(_lerp(0.05, 1.0, s)),
    )


@register_op("perspective")
def perspective(img: Image.Image, s: float, rng: np.random.Generator, ctx: OpContext) -> Image.Image:
    """Perspective warp; corner jitter sigma 1..12 % of the shorter side."""
    return augf.perspective_transform(
        img, sigma=min(img.size) * _lerp(0.01, 0.12, s), seed=int(rng.integers(2**31)),
        crop_out_black_border=True,
    )


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
