"""Patch plans: boxes valid, patch 0 the full image, counts and kinds as configured."""
import pytest
from pydantic import ValidationError

from patchers.plan import plan_table
from patchers.views import FULL, PRESETS, View, ViewConfig, plan_views


def _check_boxes(views):
    for v in views:
        x0, y0, x1, y1 = v.box
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0, v


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gives_valid_boxes_with_full_first(preset):
    views = plan_views(ViewConfig(preset=preset))
    _check_boxes(views)
    assert views[0].box == FULL and views[0].kind == "full" and views[0].rotation == 0 and not views[0].flip
    keys = [(v.box, v.rotation, v.flip) for v in views]
    assert len(keys) == len(set(keys)), "duplicate views"


def test_counts_follow_the_config():
    cfg = ViewConfig(rotations=[90, 270], flip=True, center_crops=[0.5], corner_crops=[0.6], grids=[2, 3],
                     center_tiles=[0.7])
    views = plan_views(cfg)
    kinds = [v.kind for v in views]
    assert len(views) == 1 + 2 + 1 + 1 + 4 + (4 + 9) + 1
    assert sorted(v.rotation for v in views if v.kind == "rotation") == [90, 270]
    assert sum(v.flip for v in views) == 1
    assert kinds.count("tile") == 14 and kinds.count("crop") == 5
    # the 2x2 grid covers the image exactly
    quads = [v.box for v in views if v.kind == "tile"][:4]
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in quads) == pytest.approx(1.0)
    corners = [v.box for v in views if v.kind == "crop"][1:]
    assert {(round(b[0], 3), round(b[1], 3)) for b in corners} == {(0, 0), (0.4, 0), (0, 0.4), (0.4, 0.4)}


def test_max_patches_trims_extra_views_and_refuses_named_ones_that_do_not_fit():
    cfg = ViewConfig(grids=[2], max_patches=7)
    extra = [View("proposal", (0.1, 0.1, 0.2 + i / 10, 0.5)) for i in range(5)]
    views = plan_views(cfg, extra)
    assert len(views) == 7 and views[0].kind == "full" and [v.kind for v in views[5:]] == ["proposal"] * 2
    with pytest.raises(ValueError, match="make 26 patches an image .* more than max_patches 25"):
        ViewConfig(grids=[3, 4], max_patches=25)  # a 4 x 4 grid's last tile would be dropped unseen


def test_preset_keys_can_be_overridden():
    cfg = ViewConfig(preset="fast", rotations=[180])
    assert cfg.rotations == [180] and cfg.flip is True


@pytest.mark.parametrize("bad", [{"center_crops": [1.2]}, {"grids": [1]}, {"rotations": [45]},
                                 {"preset": "nope"}, {"colour": True}])
def test_bad_view_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        ViewConfig(**bad)


def test_plan_table_follows_the_contract():
    t = plan_table(["a", "b"], ViewConfig(preset="crops"))
    n = len(plan_views(ViewConfig(preset="crops")))
    assert t.num_rows == 2 * n
    assert t.column("patch_id").to_pylist()[:n] == list(range(n))
    assert t.schema.field("x0").type == "float"
