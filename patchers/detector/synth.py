"""Synthetic copy-region data: a photo pasted into a scene, labelled with its box (YOLO txt).

Each sample pastes one unlabeled photo onto another photo, into an AugLy screenshot template
or into a meme, then partly covers the result with text / an emoji / stripes and may rotate
it by a multiple of 90 degrees. The pasted region is tracked as a mask through every
geometric step, so the label is exact whatever AugLy does inside. Sample ``i`` depends only
on ``(seed, i)`` and the sorted photo list: chunks can run as independent (Ray) tasks and
give the same files.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from core.augment import EDITS, SCREENSHOT_TEMPLATES, emoji_names
from core.imageio import ImageDecodeError, load_rgb
from core.store import write_text

log = logging.getLogger(__name__)

WORK_SIDE = 512                       # composites are built at this long side, then resized
MEME_WORDS = ["when", "you", "me", "LOL", "the", "monday", "mood", "nobody", "finally", "wait", "why"]
Scene = Callable[[Image.Image, Image.Image, np.random.Generator], tuple[Image.Image, Image.Image]]
SCENES: dict[str, Scene] = {}


def register_scene(name: str) -> Callable[[Scene], Scene]:
    def deco(fn: Scene) -> Scene:
        SCENES[name] = fn
        return fn
    return deco


def _fit(img: Image.Image, side: int) -> Image.Image:
    f = side / max(img.size)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BILINEAR)


def _pasted_mask(fn: Callable[[Image.Image], Image.Image], photo: Image.Image) -> Image.Image:
    """Where ``fn`` puts ``photo``: run it on a black and a white image of the same size and
    keep the pixels that differ (exact for any paste/resize/pad that AugLy does)."""
    black = np.asarray(fn(Image.new("RGB", photo.size, (0, 0, 0))).convert("L"), dtype=np.int16)
    white = np.asarray(fn(Image.new("RGB", photo.size, (255, 255, 255))).convert("L"), dtype=np.int16)
    return Image.fromarray(((white - black) > 64).astype(np.uint8) * 255)


@register_scene("photo")
def paste_onto_photo(photo: Image.Image, background: Image.Image, rng: np.random.Generator
                     ) -> tuple[Image.Image, Image.Image]:
    """The photo at 10-60% of the background's area, maybe tilted, at a random place."""
    canvas = _fit(background, WORK_SIDE)
    area = rng.uniform(0.1, 0.6) * canvas.width * canvas.height
    ar = photo.width / photo.height
    w = int(min(canvas.width, np.sqrt(area * ar)))
    h = int(min(canvas.height, w / ar))
    patch = photo.resize((max(8, w), max(8, h)), Image.Resampling.BILINEAR)
    alpha = Image.new("L", patch.size, 255)
    if rng.random() < 0.3:
        angle = float(rng.uniform(-20, 20))
        patch = patch.rotate(angle, expand=True, resample=Image.Resampling.BILINEAR)
        alpha = alpha.rotate(angle, expand=True)
        f = min(1.0, canvas.width / patch.width, canvas.height / patch.height)
        patch = patch.resize((max(8, int(patch.width * f)), max(8, int(patch.height * f))))
        alpha = alpha.resize(patch.size)
    x = int(rng.integers(0, canvas.width - patch.width + 1))
    y = int(rng.integers(0, canvas.height - patch.height + 1))
    canvas.paste(patch, (x, y), alpha)
    mask = Image.new("L", canvas.size, 0)
    mask.paste(alpha, (x, y), alpha)
    return canvas, mask


@register_scene("screenshot")
def overlay_onto_screenshot(photo: Image.Image, background: Image.Image, rng: np.random.Generator
                            ) -> tuple[Image.Image, Image.Image]:
    """The photo inside one of AugLy's bundled social-media screenshot templates."""
    template = str(rng.choice(SCREENSHOT_TEMPLATES))
    crop = bool(rng.random() < 0.5)

    def fn(im: Image.Image) -> Image.Image:
        return EDITS["overlay_onto_screenshot"](im, template=template, crop_src_to_fit=crop).convert("RGB")
    return fn(photo), _pasted_mask(fn, photo)


@register_scene("meme")
def meme(photo: Image.Image, background: Image.Image, rng: np.random.Generator
         ) -> tuple[Image.Image, Image.Image]:
    """The photo under a meme caption (AugLy meme_format, random words and colours)."""
    photo = _fit(photo, int(rng.integers(256, WORK_SIDE)))
    text = " ".join(rng.choice(MEME_WORDS, size=int(rng.integers(1, 4))))
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    height = int(rng.integers(photo.height // 6, photo.height // 3 + 1))

    def fn(im: Image.Image) -> Image.Image:
        return EDITS["meme_format"](im, text=text, caption_height=height, meme_bg_color=bg,
                                    text_color=fg).convert("RGB")
    return fn(photo), _pasted_mask(fn, photo)


def cover(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Partly cover the composite with text, an emoji and/or stripes (labels unchanged)."""
    if rng.random() < 0.5:
        img = EDITS["overlay_text"](img, text=[int(i) for i in rng.integers(1, 1000, int(rng.integers(3, 10)))],
                                    font_size=float(rng.uniform(0.05, 0.15)), opacity=float(rng.uniform(0.6, 1.0)),
                                    color=tuple(int(c) for c in rng.integers(0, 256, 3)),
                                    x_pos=float(rng.uniform(0, 0.6)), y_pos=float(rng.uniform(0, 0.9)))
    if rng.random() < 0.4:
        img = EDITS["overlay_emoji"](img, emoji=str(rng.choice(emoji_names())),
                                     emoji_size=float(rng.uniform(0.1, 0.3)), opacity=float(rng.uniform(0.7, 1.0)),
                                     x_pos=float(rng.uniform(0, 0.8)), y_pos=float(rng.uniform(0, 0.8)))
    if rng.random() < 0.2:
        img = EDITS["overlay_stripes"](img, line_width=float(rng.uniform(0.1, 0.4)),
                                       line_color=tuple(int(c) for c in rng.integers(0, 256, 3)),
                                       line_angle=float(rng.uniform(-90, 90)),
                                       line_density=float(rng.uniform(0.2, 0.5)),
                                       line_opacity=float(rng.uniform(0.3, 0.6)))
    return img.convert("RGB")


def composite(photo: Image.Image, background: Image.Image, rng: np.random.Generator, side: int
              ) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """One training sample at long side ``side`` and the pasted photo's box (fractions)."""
    scene = str(rng.choice(sorted(SCENES)))
    img, mask = SCENES[scene](_fit(photo, WORK_SIDE), background, rng)
    img = cover(img, rng)
    turn = int(rng.integers(0, 4)) if rng.random() < 0.25 else 0
    if turn:
        op = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[turn - 1]
        img, mask = img.transpose(op), mask.transpose(op)
    img, mask = _fit(img, side), _fit(mask, side)
    x0, y0, x1, y1 = mask.point(lambda v: 255 if v >= 128 else 0).getbbox() or (0, 0, img.width, img.height)
    return img, (x0 / img.width, y0 / img.height, x1 / img.width, y1 / img.height)


def yolo_line(box: tuple[float, float, float, float]) -> str:
    """``class cx cy w h`` (class 0 = copy), all fractions."""
    x0, y0, x1, y1 = box
    return f"0 {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n"


def split_photos(photos: list[str]) -> dict[str, list[str]]:
    """Disjoint source photos per split: every 10th photo feeds validation only."""
    photos = sorted(photos)
    val = photos[::10]
    return {"train": [p for i, p in enumerate(photos) if i % 10] or val, "val": val}


def generate_chunk(photos: list[str], out: str, split: str, start: int, stop: int, seed: int,
                   side: int) -> int:
    """Write samples ``start..stop-1`` of ``split`` (images/<split>, labels/<split>) and a
    done marker; returns how many were written. A sample whose photos fail to decode is
    skipped and logged; a chunk that wrote none gets no marker, so it is tried again."""
    root = Path(out)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        try:
            photo, background = (load_rgb(photos[int(j)]) for j in rng.integers(0, len(photos), 2))
        except ImageDecodeError as e:
            log.warning(f"synthetic {split} sample {i} skipped: {e}")
            continue
        img, box = composite(photo, background, rng, side)
        stem = f"{split}-{i:06d}"
        img.save(root / "images" / split / f"{stem}.jpg", quality=int(rng.integers(60, 95)))
        (root / "labels" / split / f"{stem}.txt").write_text(yolo_line(box))
        written += 1
    if written:
        write_text(root / f".done-{split}-{start:06d}", str(written))
    return written


def _done(marker: Path) -> bool:
    """A chunk is done when its marker counts some image (older versions wrote "0" for a chunk
    whose photos did not decode, which kept it from being made once they were fixed)."""
    return marker.is_file() and marker.read_text().strip() not in ("", "0")


def chunk_calls(photos: list[str], out: str, sizes: dict[str, int], seed: int, side: int,
                chunk: int = 64) -> list[tuple]:
    """Argument tuples of :func:`generate_chunk` for the chunks not yet done."""
    if not photos:
        raise ValueError("synthetic detector data: no training photos given")
    by_split = split_photos(photos)
    calls = []
    for split, n in sizes.items():
        for start in range(0, n, chunk):
            if not _done(Path(out) / f".done-{split}-{start:06d}"):
                calls.append((by_split[split], out, split, start, min(start + chunk, n), seed, side))
    return calls


def write_data_yaml(out: str) -> str:
    """The ultralytics dataset file, with an absolute ``path`` (settings' datasets_dir is ignored)."""
    root = Path(out).resolve()
    text = (f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: copy\n")
    write_text(root / "data.yaml", text)
    return str(root / "data.yaml")
