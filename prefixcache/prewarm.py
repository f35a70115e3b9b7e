"""Prewarming: turn recipes into stored, pinned KV prefixes.

The library side of ``prefixcache prewarm`` (and of the server's start-up). A recipe that is
already stored and current is skipped without touching the model; a recipe whose content changed
(an edited include, a new tool) is pinned again, and ``PrefixCache.pin`` restores the longest
stored prefix first, so only the part from the first changed segment on is evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config
from .cache import PrefixCache
from .errors import ConfigError
from .kvstate import Progress
from .recipes import Recipe, check_fits, check_token_limits
from .segment import Pin


@dataclass(frozen=True)
class PrewarmResult:
    """What prewarming one recipe did."""

    recipe: str
    path: Path
    n_tokens: int
    evaluated_tokens: int  # prefilled now (0 when skipped or fully restored)
    new_segments: int
    new_bytes: int
    skipped: bool  # already stored and current: the model was not touched
    pinned: bool
    seconds: float

    @property
    def reused_tokens(self) -> int:
        return self.n_tokens - self.evaluated_tokens


def recipe_tokens(cache: PrefixCache, recipe: Recipe) -> list[int]:
    """The recipe's prefix as tokens of ``cache``'s model, after its token limits are checked.

    Raises RecipeError (naming the recipe file and line) for an include over its ``max_tokens``
    or a prefix that does not fit the context.
    """
    check_token_limits(recipe, lambda text: len(cache.template.tokenize(text)))
    tokens = cache.template.prefix_tokens(recipe.messages, recipe.tools or None)
    check_fits(recipe, len(tokens), cache.kv.n_ctx)
    return tokens


def current_pin(cache: PrefixCache, recipe: Recipe, namespace: str | None = None) -> Pin | None:
    """The recipe's pin if its stored prefix is complete and was built from this content."""
    digest = recipe.content_digest()
    for pin in cache.pins(namespace):
        if pin.name == recipe.name and pin.digest == digest and cache.store.get(pin.key):
            return pin
    return None


def prewarm(
    cache: PrefixCache,
    recipe: Recipe,
    *,
    progress: Progress | None = None,
    force: bool = False,
    namespace: str | None = None,
) -> PrewarmResult:
    """Evaluate and store one recipe's prefix, unless it is stored and current already.

    A recipe with ``pinned: false`` is stored as ordinary LRU entries (its pin record expires at
    once, keeping only the content digest). ``force`` re-pins even a current recipe (still
    evaluating only what the store lacks).
    """
    t0 = time.perf_counter()
    tokens = recipe_tokens(cache, recipe)
    existing = None if force else current_pin(cache, recipe, namespace)
    if existing is not None and existing.n_tokens == len(tokens):
        return PrewarmResult(
            recipe.name, recipe.path, len(tokens), 0, 0, 0, True, recipe.pinned, 0.0
        )
    info = cache.pin(
        recipe.messages,
        recipe.name,
        tools=recipe.tools or None,
        ttl=recipe.ttl if recipe.pinned else 0.0,
        namespace=namespace,
        progress=progress,
        source=str(recipe.path),
        digest=recipe.content_digest(),
        prefix_tokens=tokens,
    )
    return PrewarmResult(
        recipe.name,
        recipe.path,
        info.n_tokens,
        info.evaluated_tokens,
        info.new_segments,
        info.new_bytes,
        False,
        recipe.pinned,
        time.perf_counter() - t0,
    )


def recipe_model(recipe: Recipe, default: str | None = None) -> Path:
    """The model a recipe runs on: its own ``model``, else ``default``, else the bundled one."""
    return config.resolve_model(recipe.model or default)


def group_by_model(
    recipes: Iterable[Recipe], default_model: str | None = None
) -> dict[Path, list[Recipe]]:
    """Recipes grouped by model file, so that each model is loaded once."""
    groups: dict[Path, list[Recipe]] = {}
    for recipe in recipes:
        groups.setdefault(recipe_model(recipe, default_model), []).append(recipe)
    return groups


def context_size(recipes: Sequence[Recipe], override: int | None = None) -> int:
    """The context for a group of recipes: ``override`` if given, else the largest ``n_ctx``
    the recipes ask for, else the default."""
    if override:
        return override
    return max((r.n_ctx for r in recipes if r.n_ctx), default=config.DEFAULT_N_CTX)


def chat_options(
    recipes: Sequence[Recipe], chat_template: str | None = None, chat_format: str | None = None
) -> tuple[str | None, str | None]:
    """``(chat_template, chat_format)`` for a group of recipes on one model: the ones their model
    sections name, else the given defaults. Raises ConfigError when they name different ones."""
    asked = {(r.chat_template, r.chat_format) for r in recipes if r.chat_template or r.chat_format}
    if len(asked) > 1:
        names = ", ".join(r.name for r in recipes if r.chat_template or r.chat_format)
        raise ConfigError(
            f"recipes {names} run on one model with different chat templates or formats; "
            "give them the same one (a loaded model renders with one template)"
        )
    if asked:
        return asked.pop()
    return chat_template, chat_format


ProgressFactory = Callable[[Recipe], Progress | None]


def prewarm_all(
    cache: PrefixCache,
    recipes: Iterable[Recipe],
    *,
    progress: ProgressFactory | None = None,
    force: bool = False,
    namespace: str | None = None,
) -> list[PrewarmResult]:
    """Prewarm recipes in order (parents before children, as ``load_recipes`` returns them).

    ``progress(recipe)`` may return a callback that receives ``(done, total)`` evaluated tokens.
    """
    results = []
    for recipe in recipes:
        callback = progress(recipe) if progress else None
        results.append(prewarm(cache, recipe, progress=callback, force=force, namespace=namespace))
    return results


__all__ = [
    "PrewarmResult",
    "chat_options",
    "context_size",
    "current_pin",
    "group_by_model",
    "prewarm",
    "prewarm_all",
    "recipe_model",
    "recipe_tokens",
]
