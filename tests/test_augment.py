"""The one AugLy op set: named edits, their assets, the recipe families drawn over them, and
detector synthesis / the sample builder applying the same edits."""
import ast
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

import augly.image.functional as augf
import numpy as np
import pytest
from augly import utils as augly_utils
from PIL import Image

from core.augment import (
    EDITS,
    FAMILIES,
    OPS,
    OpContext,
    emoji_names,
    register_edit,
    register_family,
    register_op,
)
from core.augment.assets import emoji_path, font_path, screenshot_template_path
from tests.conftest import synthetic_photo

ROOT = Path(__file__).parent.parent
# AugLy builds its perspective matrix with np.matrix; that warning is AugLy's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
# AugLy's keyword for each asset parameter of an edit, and where AugLy keeps those files.
ASSET_PARAMS = {"font": ("font_file", augly_utils.FONTS_DIR), "emoji": ("emoji_path", augly_utils.EMOJI_DIR),
                "template": ("template_filepath", augly_utils.SCREENSHOT_TEMPLATES_DIR)}
OVERLAY = synthetic_photo(21, size=(50, 40))
# Fixed parameters per edit, as the sample builder, detector synthesis and recipes pass them.
EXAMPLES: dict[str, dict] = {
    "overlay_text": {"text": [10, 20, 30, 40], "font": "NotoSans-Regular.ttf", "font_size": 0.2, "opacity": 0.9,
                     "color": [200, 30, 30], "x_pos": 0.1, "y_pos": 0.4},
    "overlay_emoji": {"emoji": "food_and_drink/red_apple.png", "emoji_size": 0.4, "opacity": 0.9,
                      "x_pos": 0.2, "y_pos": 0.3},
    "overlay_stripes": {"line_width": 0.3, "line_color": (10, 200, 30), "line_angle": 30.0, "line_density": 0.5,
                        "line_type": "dashed", "line_opacity": 0.7},
    "overlay_image": {"overlay": OVERLAY, "overlay_size": 0.5, "x_pos": 0.2, "y_pos": 0.3, "opacity": 1.0,
                      "max_visible_opacity": 1.0},
    "meme_format": {"text": "LOL", "font": "NotoSans-Regular.ttf", "caption_height": 40,
                    "text_color": (20, 20, 20), "meme_bg_color": (250, 240, 200)},
    "overlay_onto_screenshot": {"template": "mobile.png", "crop_src_to_fit": True},
    "pixelization": {"ratio": 0.3},
    "encoding_quality": {"quality": 20},
    "blur": {"radius": 1.5},
    "brightness": {"factor": 1.5},
    "color_jitter": {"brightness_factor": 1.3, "contrast_factor": 0.7, "saturation_factor": 1.5},
    "grayscale": {},
    "crop": {"x1": 0.1, "y1": 0.2, "x2": 0.8, "y2": 0.9},
    "hflip": {},
    "vflip": {},
    "rotate": {"degrees": 20.0},
    "perspective_transform": {"sigma": 8.0, "seed": 3, "crop_out_black_border": True},
    "scale": {"factor": 0.3},
    "random_noise": {"mean": 0.0, "var": 0.02, "seed": 5},
    "pad": {"w_factor": 0.2, "h_factor": 0.4, "color": (20, 200, 90)},
}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return synthetic_photo(7, size=(128, 96))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def augly_kwargs(params: dict) -> dict:
    """``params`` as AugLy's own keywords: asset names as files, colours as tuples."""
    out = {}
    for key, value in params.items():
        if key in ASSET_PARAMS:
            key, value = ASSET_PARAMS[key][0], os.path.join(ASSET_PARAMS[key][1], value)
        out[key] = tuple(value) if key.endswith("color") else value
    return out


class Recorder:
    """Wraps every edit in ``EDITS`` and records ``(name, params, output)`` per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, dict, Image.Image]] = []
        for name, fn in list(EDITS.items()):
            monkeypatch.setitem(EDITS, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def edit(img, **params):
            out = fn(img, **params)
            self.calls.append((name, params, out))
            return out
        return edit


# --- edits ------------------------------------------------------------------------------

def test_examples_cover_every_edit():
    assert set(EXAMPLES) == set(EDITS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_edit_runs_on_a_small_image(name, photo):
    out = EDITS[name](photo, **EXAMPLES[name])
    assert isinstance(out, Image.Image) and min(out.size) >= 4
    a = np.asarray(out.convert("RGB").resize(photo.size), np.float32)
    assert np.abs(a - np.asarray(photo, np.float32)).mean() > 0.5  # the edit really changes the image


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_edit_is_the_augly_call_with_assets_resolved(name, photo):
    """Pixel-identical to calling AugLy's function of the same name with file paths."""
    direct = getattr(augf, name)(photo, **augly_kwargs(EXAMPLES[name]))
    assert same(EDITS[name](photo, **EXAMPLES[name]), direct)


def defaults(name: str) -> dict:
    """The parameters of edit ``name`` (after the image) that have a default, with it."""
    params = list(inspect.signature(EDITS[name]).parameters.items())[1:]
    return {key: p.default for key, p in params if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", sorted(n for n in EDITS if defaults(n)))
def test_edit_defaults_are_augly_defaults(name):
    """Callers that leave a parameter out (detector synthesis does) get what AugLy would use."""
    theirs = inspect.signature(getattr(augf, name)).parameters
    for key, default in defaults(name).items():
        [(augly_key, augly_default)] = augly_kwargs({key: default}).items()
        expected = theirs[augly_key].default
        assert (list(augly_default) == list(expected)) if isinstance(expected, list | tuple) \
            else augly_default == expected, (name, key)


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="edit 'blur' is already registered"):
        register_edit("blur")(lambda img: img)
    with pytest.raises(ValueError, match="augmentation op 'jpeg' is already registered"):
        register_op("jpeg")(lambda img, s, rng, ctx: img)
    with pytest.raises(ValueError, match="family 'fog': no edit 'fog'"):
        register_family("fog")(lambda img, s, rng, ctx: (img, {}))
    assert "fog" not in OPS and EDITS["blur"].__name__ == "blur"


def test_plain_edits_refuse_unknown_parameters(photo):
    with pytest.raises(TypeError, match="radiu"):
        EDITS["blur"](photo, radiu=2.0)


def test_assets_resolve_by_name_and_refuse_the_rest():
    assert font_path("Raleway-ExtraBold.ttf") == augly_utils.MEME_DEFAULT_FONT
    assert emoji_path("smileys/smiling_face_with_heart_eyes.png") == augly_utils.EMOJI_PATH
    assert screenshot_template_path("web.png") == augly_utils.TEMPLATE_PATH
    for call, name in ((font_path, "Nope.ttf"), (emoji_path, "../fonts/NotoSans-Regular.ttf"),
                       (screenshot_template_path, augly_utils.TEMPLATE_PATH)):
        with pytest.raises(FileNotFoundError, match="no AugLy"):
            call(name)


def test_emoji_names_are_sorted_group_names():
    every = emoji_names()
    assert list(every) == sorted(every) and all(n.count("/") == 1 for n in every)
    assert {n.split("/")[0] for n in every} >= {"smileys", "objects", "food_and_drink"}
    smileys = emoji_names(["smileys"])
    assert smileys and set(smileys) < set(every) and all(n.startswith("smileys/") for n in smileys)
    assert len(every) == len(list(Path(augly_utils.EMOJI_DIR).rglob("*.png")))


# --- recipe families --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_applies_its_edit_with_the_params_it_drew(name, photo):
    ctx = OpContext(backgrounds=[synthetic_photo(8, size=(90, 70))])
    family = FAMILIES[name]
    assert OPS[name] is family and family.edit in EDITS
    for seed, s in ((0, 0.0), (1, 0.6), (2, 1.0)):
        image, params = family.draw(photo, s, np.random.default_rng(seed), ctx)
        assert same(OPS[name](photo, s, np.random.default_rng(seed), ctx), EDITS[family.edit](image, **params))


def test_ops_outside_the_families_do_not_use_augly():
    """The remaining ops are torchvision / PIL ones (AugLy goes through an edit)."""
    assert set(OPS) - set(FAMILIES) == {"rotate90", "tv_affine", "tv_erase", "tv_grayscale", "tv_hue",
                                        "tv_posterize"}


# --- one place calls AugLy --------------------------------------------------------------

def _imports_augly(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "augly" or n.startswith("augly.") for n in names):
            return True
    return False


def test_only_core_augment_imports_augly():
    users = {p.relative_to(ROOT).as_posix()
             for package in ("core", "pretrain", "patchers", "ensemble", "jobs", "bench")
             for p in (ROOT / package).rglob("*.py") if _imports_augly(p)}
    assert users and all(u.startswith("core/augment/") for u in users), sorted(users)


def test_detector_synthesis_applies_the_shared_edits(monkeypatch):
    from patchers.detector import synth
    rec = Recorder(monkeypatch)
    photo, background = synthetic_photo(1, size=(120, 90)), synthetic_photo(2, size=(160, 120))
    for seed in range(2):
        for scene in ("screenshot", "meme"):
            synth.SCENES[scene](photo, background, np.random.default_rng(seed))
    for seed in range(30):  # each cover layer is drawn with probability 0.5, 0.4, 0.2
        synth.cover(photo, np.random.default_rng(seed))
    used = {name for name, _, _ in rec.calls}
    assert used == {"overlay_onto_screenshot", "meme_format", "overlay_text", "overlay_emoji", "overlay_stripes"}


# --- sample builder ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "bench" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


SAMPLE_EDITS = {"crop": "crop", "rotate": "rotate", "perspective": "perspective_transform", "flip": "hflip",
                "blur": "blur", "brightness": "brightness", "grayscale": "grayscale",
                "pixelization": "pixelization", "jpeg": "encoding_quality", "overlay_text": "overlay_text",
                "overlay_emoji": "overlay_emoji", "overlay_unrelated": "overlay_image",
                "meme_format": "meme_format", "overlay_onto_screenshot": "overlay_onto_screenshot"}


def test_sample_families_record_the_params_of_the_shared_edit(make_sample, monkeypatch):
    """Each family applies one shared edit; what queries_meta.csv records is what it passed
    (overlay_unrelated records the photo's Flickr id instead of the photo)."""
    assert set(SAMPLE_EDITS) == set(make_sample.FAMILIES)
    ctx = make_sample.Context(overlays=[("123", OVERLAY)], emojis=list(emoji_names(make_sample.EMOJI_GROUPS)))
    photo = synthetic_photo(5, size=(160, 120))
    for family, (_, fn) in sorted(make_sample.FAMILIES.items()):
        rec = Recorder(monkeypatch)
        out, recorded = fn(photo, np.random.default_rng(3), ctx)
        [(edit, passed, result)] = rec.calls
        assert edit == SAMPLE_EDITS[family] and out is result
        assert json.loads(json.dumps(recorded)) == recorded  # plain JSON, as written to the csv
        if family == "overlay_unrelated":
            recorded = {**{k: v for k, v in recorded.items() if k != "flickr_id"}, "overlay": OVERLAY}
        assert {k: passed[k] for k in recorded} == recorded, family
        if family == "meme_format":
            assert passed["font"] == make_sample.MEME_FONT
