"""Recipes (kept for imports): the code lives in the :mod:`prefixcache.recipe` package."""

from .recipe import *  # noqa: F403 - the same public names, listed once in recipe/__init__.py
from .recipe import __all__ as __all__
