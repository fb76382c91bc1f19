"""AugLy 1.0.0 on current Pillow/NumPy: meme_format and perspective_transform run after the shim."""
import augly.image as imaugs
import augly.image.functional as augf
import augly.image.utils.bboxes as aug_bboxes
import augly.image.utils.utils as aug_utils
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from core.augment import compat as augly_compat

RED = (200, 30, 30)
# AugLy builds its perspective matrix with np.matrix; that warning is AugLy's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


@pytest.fixture
def photo() -> Image.Image:
    """64x48 RGB: a red field with a blue square in the top-left quarter."""
    img = Image.new("RGB", (64, 48), RED)
    img.paste((20, 40, 220), (0, 0, 32, 24))
    return img


def _check_meme(meme: Image.Image, photo: Image.Image, caption_height: int) -> None:
    assert meme.mode == "RGB" and meme.size == (photo.width, photo.height + caption_height)
    arr = np.asarray(meme)
    assert np.array_equal(arr[caption_height:], np.asarray(photo))  # photo pasted under the band
    band = arr[:caption_height]
    ink = np.argwhere((band < 128).all(axis=2))  # black text on the white band
    assert len(ink) > 0, "caption has no text"
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
    assert x0 > 0 and x1 < photo.width - 1 and y0 > 0 and y1 < caption_height - 1  # not clipped
    assert abs((x0 + x1) / 2 - photo.width / 2) <= 4  # centred horizontally


def test_meme_format_adds_a_caption_band(photo):
    meme = imaugs.meme_format(photo, text="LOL", caption_height=30)
    _check_meme(meme, photo, 30)


def test_meme_format_transform_class(photo):
    meme = imaugs.MemeFormat(text="so true", caption_height=40)(photo)
    _check_meme(meme, photo, 40)


def test_caption_font_measures_what_is_drawn():
    font = augly_compat.CaptionFont(str(augf.utils.pathmgr.get_local_path(
        augf.utils.MEME_DEFAULT_FONT)), 20)
    w, h = font.getsize_multiline("two\nlines here")
    canvas = Image.new("L", (200, 100), 0)
    ImageDraw.Draw(canvas).multiline_text((0, 0), "two\nlines here", font=font, fill=255)
    _, _, right, bottom = canvas.getbbox()
    assert right <= w <= right + 2 and bottom <= h <= bottom + 2
    assert h > font.getsize_multiline("one line")[1] * 1.5  # two lines are taller than one


def test_perspective_transform_runs(photo):
    out = imaugs.perspective_transform(photo, sigma=8.0, seed=3)
    assert out.mode == "RGB" and out.size == photo.size
    assert np.abs(np.asarray(out, np.float32) - np.asarray(photo, np.float32)).mean() > 1.0


def test_perspective_transform_class(photo):
    out = imaugs.PerspectiveTransform(sigma=8.0, seed=3)(photo)
    assert out.mode == "RGB" and out.size == photo.size
    assert np.array_equal(np.asarray(out), np.asarray(imaugs.perspective_transform(photo, sigma=8.0, seed=3)))


@pytest.mark.parametrize("box", [(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)])
def test_perspective_bbox_helper_matches_the_warped_pixels(box):
    """AugLy's bbox maths (the other np.float user) agrees with the warped image of the box."""
    w, h = 64, 48
    mask = Image.new("RGB", (w, h), 0)
    mask.paste((255, 255, 255), (int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    warped = np.asarray(imaugs.perspective_transform(mask, sigma=8.0, seed=3).convert("L")) > 127
    ys, xs = np.nonzero(warped)
    seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    helper = aug_bboxes.perspective_transform_bboxes_helper(
        bbox=box, src_w=w, src_h=h, sigma=8.0, dx=0, dy=0, seed=3, crop_out_black_border=False)
    assert np.abs(np.array(helper) * [w, h, w, h] - seen).max() <= 2.0


def test_apply_is_idempotent():
    before = (aug_utils.np, aug_bboxes.np, augf.ImageFont)
    assert augly_compat.apply() == []
    assert augly_compat.apply() == []
    assert (aug_utils.np, aug_bboxes.np, augf.ImageFont) == before


def test_shim_is_scoped_to_augly():
    # AugLy sees the old names ...
    assert aug_utils.np.float is float and aug_utils.np.matrix is np.matrix
    # ... the libraries themselves are left as they are.
    assert "float" not in np.__dict__
    assert augf.ImageFont.FreeTypeFont is ImageFont.FreeTypeFont
    assert not hasattr(ImageFont.FreeTypeFont, "getsize_multiline")
