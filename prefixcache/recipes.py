"""Recipes (kept for imports): the code lives in the :mod:`prefixcache.recipe` package."""

from .recipe import (
    RECIPE_SUFFIXES,
    IncludeSpec,
    Recipe,
    RecipeRoot,
    check_fits,
    check_token_limits,
    load_recipe,
    load_recipes,
    parse_duration,
    watched_paths,
)

__all__ = [
    "RECIPE_SUFFIXES",
    "IncludeSpec",
    "Recipe",
    "RecipeRoot",
    "check_fits",
    "check_token_limits",
    "load_recipe",
    "load_recipes",
    "parse_duration",
    "watched_paths",
]
