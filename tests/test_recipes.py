"""Recipes: every family runs, outputs are reproducible by seed, intensity ramps over epochs."""

import numpy as np
import pytest
from PIL import Image

from pretrain.recipes import (
    OPS,
    RECIPES,
    SET_RECIPES,
    OpContext,
    Recipe,
    Schedule,
    Step,
    get_recipe,
    recipe_names,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    grad = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
    return Image.fromarray(np.clip(grad + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def background() -> Image.Image:
    return Image.new("RGB", (64, 56), (10, 200, 30))


def diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference after resizing ``a`` to ``b``'s size."""
    a = a.resize(b.size)
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_family_edits_a_small_image(name, photo, background):
    ctx = OpContext(backgrounds=[background])
    outs = [OPS[name](photo, s, np.random.default_rng(7), ctx) for s in (0.0, 0.5, 1.0)]
    assert all(o.mode == "RGB" and min(o.size) >= 4 for o in outs)
    assert max(diff(o, photo) for o in outs) > 1.0  # the family really changes the image


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_deterministic_by_seed(name, photo, background):
    recipe, ctx = get_recipe(name), OpContext(backgrounds=[background])
    run = [[np.asarray(recipe(photo, seed=3, key=k, epoch=6, ctx=ctx)) for k in range(6)] for _ in range(2)]
    assert all(a.shape == b.shape and (a == b).all() for a, b in zip(*run))
    other = [np.asarray(recipe(photo, seed=4, key=k, epoch=6, ctx=ctx)) for k in range(6)]
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(run[0], other))


def test_string_keys_are_stable_and_distinct(photo):
    recipe = get_recipe("basic")
    a = recipe(photo, seed=0, key="T00001", epoch=2)
    assert (np.asarray(a) == np.asarray(recipe(photo, seed=0, key="T00001", epoch=2))).all()
    assert recipe.rng(0, "T00001", 2).random() != recipe.rng(0, "T00002", 2).random()


def test_schedule_ramps_from_start_to_one():
    s = Schedule(start=0.25, ramp_epochs=4)
    assert [s(e) for e in range(6)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0])
    assert Schedule(start=0.5, ramp_epochs=0)(0) == 1.0


def test_intensity_grows_the_edit(photo):
    """Same draws, later epoch -> tighter crops (crop keeps 0.95..0.4 of each side)."""
    recipe = Recipe("crops", (Step("crop", 1.0, (0.0, 1.0)),), Schedule(start=0.1, ramp_epochs=10))

    def area(epoch: int) -> float:
        return float(np.mean([np.prod(recipe(photo, seed=0, key=k, epoch=epoch).size) for k in range(16)]))

    assert area(0) > 1.5 * area(10)
    assert area(0) > 0.7 * np.prod(photo.size)  # epoch 0: at most 10 % of the strength range


def test_max_ops_caps_the_edits(photo):
    recipe = Recipe("capped", (Step("hflip"), Step("vflip"), Step("tv_grayscale")), max_ops=1)
    singles = [np.asarray(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
               np.asarray(photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)),
               np.asarray(photo.convert("L").convert("RGB"))]
    for key in range(6):  # exactly one of the three edits, never a combination
        out = np.asarray(recipe(photo, seed=0, key=key, epoch=0))
        assert sum(int(np.abs(out.astype(int) - s).max() <= 1) for s in singles) == 1


def test_bad_steps_and_names_are_named_in_errors():
    with pytest.raises(ValueError, match="unknown augmentation op 'nope'"):
        Step("nope")
    with pytest.raises(ValueError, match="'jpeg'"):
        Step("jpeg", p=1.5)
    with pytest.raises(ValueError, match="unknown recipe 'zzz'"):
        get_recipe("zzz")
    with pytest.raises(ValueError, match="between 1 and 11"):
        recipe_names(12)


def test_eleven_distinct_training_sets():
    names = recipe_names(11)
    assert names == SET_RECIPES and len(set(names)) == 11 and not {"byol_views", "severe"} & set(names)


def test_downscale_makes_thumbnails_but_never_below_16_px(photo):
    rng, ctx = np.random.default_rng(0), OpContext()
    assert OPS["downscale"](photo.resize((400, 300)), 1.0, rng, ctx).size == (60, 45)  # 0.15 of each side
    assert min(OPS["downscale"](photo, 1.0, rng, ctx).size) == 16  # 40 px high: 0.4, not 0.15


def test_meme_format_fits_its_caption_on_small_wide_photos():
    """Regression: a 153x78 photo made AugLy shrink the caption font below 0 px."""
    from PIL import Image

    from pretrain.recipes import OPS, OpContext
    photo = Image.new("RGB", (153, 78), (120, 160, 90))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out = OPS["meme_format"](photo, float(seed % 5) / 4, rng, OpContext())
        assert out.height > out.width * 78 / 153
