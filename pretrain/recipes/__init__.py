"""Augmentation recipes (AugLy + torchvision) that turn unlabeled photos into training sets.

The AugLy compatibility shim is imported first: it patches AugLy 1.0.0 for current
Pillow/NumPy before any recipe can call meme_format or perspective_transform.
"""

from pretrain.recipes import augly_compat  # noqa: F401  (must run before AugLy is used)
from pretrain.recipes.catalog import RECIPES, SET_RECIPES, get_recipe, recipe_names, register_recipe
from pretrain.recipes.ops import OPS, OpContext, register_op
from pretrain.recipes.recipe import Recipe, Schedule, Step, image_key

__all__ = [
    "OPS", "RECIPES", "SET_RECIPES", "OpContext", "Recipe", "Schedule", "Step", "get_recipe",
    "image_key", "recipe_names", "register_op", "register_recipe",
]
