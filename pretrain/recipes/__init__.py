"""Augmentation recipes that turn unlabeled photos into training sets (ops: :mod:`core.augment`)."""

from core.augment import OPS, OpContext, register_op
from pretrain.recipes.catalog import (
    RECIPES,
    SET_RECIPES,
    get_recipe,
    recipe_names,
    register_recipe,
)
from pretrain.recipes.recipe import (
    FULL_STRENGTH_EPOCH,
    VALIDATION_SEED,
    Recipe,
    RecipeError,
    Schedule,
    Step,
    image_key,
)

__all__ = [
    "FULL_STRENGTH_EPOCH", "OPS", "RECIPES", "SET_RECIPES", "VALIDATION_SEED", "OpContext", "Recipe", "RecipeError",
    "Schedule", "Step", "get_recipe", "image_key", "recipe_names", "register_op", "register_recipe",
]
