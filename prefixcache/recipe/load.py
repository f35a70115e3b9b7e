"""Loading recipes: files and folders, ``extends`` chains (with cycle checks), unique names and
aliases, the files a server watches, and the checks that need a tokenizer's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .fields import _TOP_LEVEL_KEYS, _alias_line, _check_keys
from .model import Recipe
from .paths import RecipeRoot, _absolute, _confine, _display_path, _Roots, _roots
from .yaml import _key_line, _read_yaml, _show

#: File suffixes read when a folder is given to :func:`load_recipes`.
RECIPE_SUFFIXES = (".yaml", ".yml")


def load_recipe(path: str | Path, *, root: RecipeRoot = None) -> Recipe:
    """Load one recipe file, following its ``extends`` chain (confined to ``root`` if given)."""
    roots = _roots(root)
    _confine(Path(path), roots, "recipe file", Path(path), None)
    return _load(Path(path), {}, (), roots)


def load_recipes(paths: Iterable[str | Path], *, root: RecipeRoot = None) -> list[Recipe]:
    """Load recipe files and folders (each ``*.yaml``/``*.yml`` directly inside, sorted).

    Parents come before their children, and each recipe appears once, including a parent that was
    not named itself. Two recipes with the same name are an error, since names identify them.

    ``root`` (a folder, or several) confines what the recipes may read: each recipe file, each
    ``extends`` parent and each included file must resolve, after symlinks, under one of them, else
    :class:`RecipeError` names the file and line. ``None`` (the default) allows any file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    roots = _roots(root)
    loaded: dict[Path, Recipe] = {}
    ordered: dict[Path, Recipe] = {}
    for file in _recipe_files(paths):
        _confine(file, roots, "recipe file", file, None)
        for recipe in _load(file, loaded, (), roots).chain:
            ordered.setdefault(recipe.path, recipe)
    recipes = list(ordered.values())
    _check_unique_names(recipes)
    return recipes


def _load(path: Path, loaded: dict[Path, Recipe], stack: tuple[Path, ...], roots: _Roots) -> Recipe:
    """Load ``path`` and its parents; ``loaded`` shares recipes, ``stack`` catches cycles."""
    path = path.resolve()
    if path in loaded:
        return loaded[path]
    data = _read_yaml(path)
    # Report this file's own key mistakes before any in its parent.
    _check_keys(data, _TOP_LEVEL_KEYS, "top-level key", path)
    parent = _load_parent(data, path, loaded, (*stack, path), roots)
    recipe = Recipe.from_dict(data, path=path, parent=parent, root=roots)
    loaded[path] = recipe
    return recipe


def _load_parent(
    data: Mapping[str, Any],
    path: Path,
    loaded: dict[Path, Recipe],
    stack: tuple[Path, ...],
    roots: _Roots,
) -> Recipe | None:
    """Load the recipe named by ``extends``, if any, refusing cycles."""
    value = data.get("extends")
    if value is None:
        return None
    line = _key_line(data, "extends")
    if not isinstance(value, str) or not value:
        raise RecipeError(
            f"extends must be the path of a parent recipe, got {_show(value)}", path=path, line=line
        )
    _confine(_absolute(path.parent, value), roots, "extends", path, line, value)
    parent_path = _absolute(path.parent, value).resolve()
    if parent_path == path:
        raise RecipeError("a recipe cannot extend itself", path=path, line=line)
    if parent_path in stack:
        cycle = [*stack[stack.index(parent_path) :], parent_path]
        shown = " -> ".join(_display_path(p, path.parent) for p in cycle)
        raise RecipeError(f"extends makes a cycle: {shown}", path=path, line=line)
    if not parent_path.is_file():
        raise RecipeError(f"extends: no such recipe file '{value}'", path=path, line=line)
    return _load(parent_path, loaded, stack, roots)


def _recipe_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Each named file, and the recipe files directly inside each named folder."""
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file())
            if not files:
                raise RecipeError("folder holds no *.yaml or *.yml recipes", path=path)
            yield from files
        elif path.exists():
            yield path
        else:
            raise RecipeError("no such recipe file or folder", path=path)


def _check_unique_names(recipes: Sequence[Recipe]) -> None:
    """Names and aliases identify recipes (and, in a server, the model they run on)."""
    seen: dict[str, Recipe] = {}
    for recipe in recipes:
        other = seen.setdefault(recipe.name, recipe)
        if other is not recipe:
            raise RecipeError(
                f"recipe name '{recipe.name}' is already used by {other.path}; "
                "give one of them another name:",
                path=recipe.path,
            )
    for recipe in recipes:
        for alias in recipe.aliases:
            other = seen.setdefault(alias, recipe)
            if other is not recipe:
                what = "name" if other.name == alias else "alias"
                raise RecipeError(
                    f"alias '{alias}' is already the {what} of recipe '{other.name}' "
                    f"({other.path}); give it another alias",
                    path=recipe.path,
                    line=_alias_line(recipe, alias),
                )


def watched_paths(recipes: Iterable[Recipe]) -> set[Path]:
    """The files a set of loaded recipes was built from, and the folders holding them.

    A change to any of them (an edit, or a file added to or removed from a folder) may change a
    recipe's prefix; a server polls their modification times to know when to reload.
    """
    out: set[Path] = set()
    for recipe in recipes:
        for r in recipe.chain:
            out.update((r.path, r.path.parent))
            for spec in r.includes:
                out.update(spec.files)
                out.update(f.parent for f in spec.files)
    return out


def check_token_limits(recipe: Recipe, count_tokens: Callable[[str], int]) -> None:
    """Check each include's ``max_tokens`` along the recipe's chain, counting with ``count_tokens``.

    Token counts need the model's tokenizer, so this runs after loading, when one is at hand.
    """
    for owner in recipe.chain:
        for spec in owner.includes:
            if spec.max_tokens is None:
                continue
            n_tokens = count_tokens(owner.own_messages[spec.message_index]["content"])
            if n_tokens > spec.max_tokens:
                raise RecipeError(
                    f"include renders to {n_tokens} tokens, more than max_tokens "
                    f"{spec.max_tokens}; narrow its paths or raise max_tokens",
                    path=owner.path,
                    line=spec.line,
                )


def check_fits(recipe: Recipe, n_tokens: int, n_ctx: int) -> None:
    """Refuse a prefix of ``n_tokens`` tokens that does not fit a context of ``n_ctx``."""
    if n_tokens > n_ctx:
        suggested = 1 << n_tokens.bit_length()
        raise RecipeError(
            f"the prefix needs {n_tokens} tokens but the context holds {n_ctx}; "
            f"raise n_ctx (e.g. n_ctx: {suggested}) or shorten the prefix",
            path=recipe.path,
            line=recipe.line,
        )
