"""The named recipes (RECIPES): one per generated training set, plus the BYOL view recipe.

Sets differ in which edit families dominate, like the D2LV training sets; ``recipe_names(n)``
gives the first ``n`` set recipes in a fixed order, so ``sets: 11`` always means the same sets.
"""

from __future__ import annotations

from pretrain.recipes.recipe import Recipe, Schedule, Step

RECIPES: dict[str, Recipe] = {}
SET_RECIPES: list[str] = []  # recipes that define a training set, in `sets: N` order

_BASE = (Step("crop", 0.6, (0.0, 0.7)), Step("hflip", 0.5), Step("colour", 0.5, (0.0, 0.6)))
_QUALITY = (Step("jpeg", 0.5), Step("blur", 0.3, (0.0, 0.7)))


def register_recipe(recipe: Recipe, *, training_set: bool = True) -> Recipe:
    """Add ``recipe`` to RECIPES (and to the ordered set list when ``training_set``)."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    if training_set:
        SET_RECIPES.append(recipe.name)
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; the error lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_names(n: int) -> list[str]:
    """The first ``n`` training-set recipes."""
    if not 1 <= n <= len(SET_RECIPES):
        raise ValueError(f"sets must be between 1 and {len(SET_RECIPES)}, got {n}")
    return SET_RECIPES[:n]


_SETS: dict[str, tuple[tuple[Step, ...], int | None]] = {
    "basic": (_BASE + _QUALITY + (Step("rotate", 0.2, (0.0, 0.5)),), None),
    "overlay_text": (_BASE + (Step("overlay_text", 0.8), Step("overlay_emoji", 0.4)) + _QUALITY, None),
    "overlay_mix": (
        _BASE + (Step("overlay_emoji", 0.6), Step("overlay_stripes", 0.4), Step("overlay_text", 0.4)),
        4,
    ),
    "meme_screenshot": (_BASE + (Step("meme_format", 0.5), Step("screenshot", 0.4)) + _QUALITY, None),
    "paste": (_BASE + (Step("paste_onto_background", 0.7), Step("overlay_text", 0.3)), None),
    "quality": (
        _BASE + (Step("pixelize", 0.5), Step("jpeg", 0.7), Step("blur", 0.5), Step("tv_posterize", 0.3)),
        4,
    ),
    "geometry": (
        (Step("crop", 0.7), Step("rotate", 0.5), Step("rotate90", 0.2), Step("vflip", 0.2),
         Step("perspective", 0.5), Step("tv_affine", 0.4), Step("hflip", 0.5)),
        4,
    ),
    "colour": (
        _BASE + (Step("tv_hue", 0.6), Step("tv_grayscale", 0.2), Step("tv_posterize", 0.3)) + _QUALITY,
        5,
    ),
    "occlusion": (_BASE + (Step("tv_erase", 0.6), Step("overlay_stripes", 0.4), Step("overlay_emoji", 0.4)), None),
    "heavy": (
        _BASE + _QUALITY + (Step("overlay_text", 0.4), Step("meme_format", 0.2), Step("screenshot", 0.2),
                            Step("paste_onto_background", 0.3), Step("pixelize", 0.3), Step("perspective", 0.3),
                            Step("rotate", 0.3), Step("overlay_emoji", 0.3)),
        5,
    ),
    "mixed": (
        (Step("crop", 0.5), Step("hflip", 0.5), Step("overlay_emoji", 0.3), Step("meme_format", 0.2),
         Step("tv_affine", 0.3), Step("colour", 0.4), Step("jpeg", 0.5), Step("pixelize", 0.2)),
        4,
    ),
}
for _name, (_steps, _max_ops) in _SETS.items():
    register_recipe(Recipe(_name, _steps, Schedule(start=0.3, ramp_epochs=5), max_ops=_max_ops))

# Validation copies past the training sets' range: ISC21's thumbnails, padding and noise on top of
# heavy's overlays and layouts, so that synthetic splits do not saturate (`copydet tune --recipe`).
register_recipe(
    Recipe(
        "severe",
        (Step("crop", 0.5), Step("hflip", 0.5), Step("colour", 0.4), Step("rotate", 0.3),
         Step("perspective", 0.3), Step("overlay_text", 0.3), Step("overlay_emoji", 0.3),
         Step("paste_onto_background", 0.3), Step("screenshot", 0.2), Step("pad", 0.3),
         Step("downscale", 0.4, (0.4, 1.0)), Step("pixelize", 0.2), Step("blur", 0.3), Step("noise", 0.3),
         Step("jpeg", 0.5)),
        Schedule(start=1.0, ramp_epochs=0),
        max_ops=5,
    ),
    training_set=False,
)

# BYOL's two views: strong crops and photometric changes (the paper's view family).
register_recipe(
    Recipe(
        "byol_views",
        (Step("crop", 1.0, (0.2, 1.0)), Step("hflip", 0.5), Step("colour", 0.8), Step("tv_grayscale", 0.2),
         Step("blur", 0.5), Step("jpeg", 0.2)),
        Schedule(start=1.0, ramp_epochs=0),
    ),
    training_set=False,
)
