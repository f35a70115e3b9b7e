"""Recipes: YAML files that declare the stable prompt prefixes an agent reuses.

A recipe names a prefix (system prompt, few-shot turns, files from disk, tool schemas) so that its
KV state can be computed once, stored, and restored by every later request that starts with it.
Loading is strict: every problem is one :class:`~prefixcache.errors.RecipeError` naming the file,
the 1-based line and what was expected. This module is pure: it reads YAML and text files and never
touches a model, so it can be tested (and recipes validated) without one.

Schema (every key is optional except ``prefix``)::

    name: coding-agent      # default: the file stem; letters, digits, '_', '.' and '-'
    aliases: [coder]        # more names a server accepts as ``model`` for this recipe (not
                            # inherited); letters, digits and '_.:/-'
    extends: base.yaml      # parent recipe, relative to this file's folder: its messages and
                            # tools come first, and settings not given here are inherited
    model: null             # GGUF path relative to this file's folder; null = the default model
    n_ctx: 8192             # positive integer
    pinned: true            # keep the stored prefix safe from eviction (default true)
    ttl: 7d                 # seconds, or text such as 90s, 30m, 12h, 7d, 1h30m; null = never
    autosave: true          # store the prefix's KV state once it is computed (default true)
    tools:                  # OpenAI tool schemas
      - type: function
        function: {name: get_order, description: ..., parameters: {type: object, ...}}
    prefix:                 # the messages, in order: shorthand items of exactly one key...
      - system: "text"
      - user: "few-shot question"
      - assistant: "few-shot answer"
      - role: assistant         # ...or OpenAI messages: role (system, developer, user,
        content: null           # assistant, tool), content (text or a list of text parts),
        tool_calls:             # name, tool_calls (assistant), tool_call_id (tool)
          - id: call_1
            type: function
            function: {name: get_order, arguments: '{"order_id": "A1"}'}
      - role: tool
        tool_call_id: call_1
        content: '{"status": "shipped"}'
      - include:                # files from disk, rendered into one message
          paths: ["../src/**/*.py", README.md]   # files or globs, relative to this folder
          ignore: ["tests/**"]  # extra gitignore-style patterns, relative to this folder
          gitignore: true       # honour .gitignore files (default true)
          max_bytes: 200000     # limit on the files' total size, checked on load
          max_tokens: 6000      # limit on the rendered message, see check_token_limits
          role: user            # system | user (default user)
          header: "Here is the code:"

``prefix`` must list at least one message, except in a recipe that extends another and adds tools.
An OpenAI message is kept as written, so that a prefix matches the messages a client sends, with
two normalisations: text content parts are joined into one string (as the server joins them), and
tool call ``arguments`` given as a mapping become JSON text (as ``json.dumps`` writes it).
YAML is read with safe loading only, and a mapping that repeats a key is an error (plain
``yaml.safe_load`` would silently keep the last value).

Includes and ``extends`` may name any file the process can read (absolute paths, ``..``, symlinks
that leave the folder), which suits recipes one writes for oneself. A loader that reads recipes
written by someone less trusted (the server) passes ``root``: every recipe file, parent and
included file must then resolve, after symlinks, under one of the root folders.
"""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec
import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import RecipeError

#: File suffixes read when a folder is given to :func:`load_recipes`.
RECIPE_SUFFIXES = (".yaml", ".yml")

_TOP_LEVEL_KEYS = (
    "name",
    "aliases",
    "extends",
    "model",
    "n_ctx",
    "pinned",
    "ttl",
    "autosave",
    "tools",
    "prefix",
)
_MESSAGE_KEYS = ("system", "user", "assistant", "include")
_OPENAI_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CONTENT_PART_KEYS = ("type", "text")
_TOOL_CALL_KEYS = ("id", "type", "function")
_CALL_FUNCTION_KEYS = ("name", "arguments")
_INCLUDE_KEYS = ("paths", "ignore", "gitignore", "max_bytes", "max_tokens", "role", "header")
_INCLUDE_ROLES = ("system", "user")
_TOOL_KEYS = ("type", "function")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ALIAS_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GLOB_RE = re.compile(r"[*?\[]")
_SECONDS_RE = re.compile(r"\d+(?:\.\d+)?")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MERGE_TAG = "tag:yaml.org,2002:merge"

#: What ``root`` may be given as: a folder, several folders, or None for no confinement.
RecipeRoot = str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None
#: The resolved root folders, or None.
_Roots = tuple[Path, ...] | None


@dataclass(frozen=True)
class IncludeSpec:
    """One ``include`` item as written, plus the files it resolved to.

    The files render into one message: the header (if any), then for each file, in order of its
    POSIX path relative to the recipe folder, a block ``### <relpath>`` followed by the content in a
    fenced code block (the fence grows past any run of backticks inside the file).
    """

    line: int  #: line of the ``- include:`` item
    patterns: tuple[str, ...]
    ignore: tuple[str, ...]
    gitignore: bool
    max_bytes: int | None
    max_tokens: int | None
    role: str
    header: str | None
    files: tuple[Path, ...]  #: absolute paths, in render order
    message_index: int  #: index of the rendered message in the recipe's ``own_messages``

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        recipe_path: Path,
        line: int,
        message_index: int,
        root: RecipeRoot = None,
    ) -> IncludeSpec:
        """Validate an ``include`` mapping and resolve its paths against the recipe's folder.

        With ``root``, each file must resolve (after symlinks) under one of its folders.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(
                f"include must be a mapping with paths: [...], got {_show(data)}",
                path=recipe_path,
                line=line,
            )
        _check_keys(data, _INCLUDE_KEYS, "include key", recipe_path)
        if "paths" not in data:
            raise RecipeError(
                "include needs paths: a list of files or globs", path=recipe_path, line=line
            )
        patterns = _get_text_list(data, "paths", recipe_path, required=True)
        ignore = _get_text_list(data, "ignore", recipe_path, required=False)
        gitignore = _get_bool(data, "gitignore", recipe_path, default=True)
        role = data.get("role", "user")
        if role not in _INCLUDE_ROLES:
            raise RecipeError(
                f"include role must be one of {', '.join(_INCLUDE_ROLES)}, got {_show(role)}",
                path=recipe_path,
                line=_key_line(data, "role"),
            )
        rules = _IgnoreRules(recipe_path.parent, ignore, use_gitignore=gitignore)
        return cls(
            line=line,
            patterns=patterns,
            ignore=ignore,
            gitignore=gitignore,
            max_bytes=_get_positive_int(data, "max_bytes", recipe_path),
            max_tokens=_get_positive_int(data, "max_tokens", recipe_path),
            role=role,
            header=_get_optional_text(data, "header", recipe_path),
            files=_resolve_files(data["paths"], rules, recipe_path, _roots(root)),
            message_index=message_index,
        )


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: its own messages and tools, its parent, and its resolved settings."""

    name: str
    path: Path  #: absolute path of the YAML file
    parent: Recipe | None
    model: str | None  #: absolute path of the GGUF file, or None for the default model
    n_ctx: int | None
    pinned: bool
    ttl: float | None  #: seconds, or None for no expiry
    autosave: bool
    own_messages: tuple[dict[str, Any], ...]
    own_tools: tuple[dict[str, Any], ...]
    includes: tuple[IncludeSpec, ...]
    line: int  #: line of the ``prefix:`` key, or 1
    #: Other names a server accepts as ``model`` for this recipe; not inherited.
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        path: str | Path,
        parent: Recipe | None = None,
        root: RecipeRoot = None,
    ) -> Recipe:
        """Build a recipe from parsed YAML; included files are read now.

        ``extends`` is not followed here: the caller passes the loaded parent (as
        :func:`load_recipe` does). Settings absent from ``data`` are taken from the parent.
        With ``root``, included files must resolve under one of its folders.
        """
        path = Path(path).absolute()
        _check_keys(data, _TOP_LEVEL_KEYS, "top-level key", path)
        tools = _parse_tools(data, path, parent)
        tool_names = [t["function"]["name"] for t in (*(parent.tools if parent else []), *tools)]
        messages, includes = _parse_prefix(
            data, path, parent, has_tools=bool(tools), roots=_roots(root), tool_names=tool_names
        )
        name = _parse_name(data, path)
        return cls(
            name=name,
            aliases=_parse_aliases(data, path, name),
            path=path,
            parent=parent,
            model=_parse_model(data, path, parent),
            n_ctx=_inherit(data, "n_ctx", parent, _get_positive_int(data, "n_ctx", path)),
            pinned=_inherit(data, "pinned", parent, _get_bool(data, "pinned", path, True)),
            ttl=_inherit(data, "ttl", parent, _parse_ttl(data, path)),
            autosave=_inherit(data, "autosave", parent, _get_bool(data, "autosave", path, True)),
            own_messages=messages,
            own_tools=tools,
            includes=includes,
            line=_key_line(data, "prefix") if "prefix" in data else 1,
        )

    def __hash__(self) -> int:
        # The generated hash would fail on the dicts inside; equal recipes share a path anyway.
        return hash(self.path)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The full prefix: the parent's messages, then this recipe's own (copies)."""
        inherited = self.parent.messages if self.parent else []
        return inherited + copy.deepcopy(list(self.own_messages))

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The parent's tools, then this recipe's own."""
        inherited = self.parent.tools if self.parent else []
        return inherited + copy.deepcopy(list(self.own_tools))

    @property
    def chain(self) -> list[Recipe]:
        """The root ancestor first, then each child down to this recipe."""
        return [*self.parent.chain, self] if self.parent else [self]

    def content_digest(self) -> str:
        """SHA-256 over everything that decides the prefix's KV state, to tell if it is current.

        Covers the rendered messages (so an edited included file changes it), the tools, the model
        and n_ctx; not pinned, ttl or autosave, which only decide how long the state is kept.
        """
        payload = {
            "messages": self.messages,
            "tools": self.tools,
            "model": self.model,
            "n_ctx": self.n_ctx,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- loading -------------------------------------------------------------------------------------


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


# --- checks that need numbers from a tokenizer ---------------------------------------------------


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


def parse_duration(value: str | float | None) -> float | None:
    """Seconds in a ttl: a number of seconds, or text such as ``90s``, ``30m``, ``12h``, ``7d``.

    Units may be combined (``1h30m``); ``w`` is weeks. ``None`` means no expiry and stays
    ``None``. Raises ``TypeError`` for other types and ``ValueError`` for text that is not a
    duration or for a duration that is not positive.
    """
    if value is None:
        return None
    expected = "seconds or a duration such as 90s, 30m, 12h or 7d"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected {expected}, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        if _SECONDS_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            parts = _DURATION_PART_RE.findall(text)
            seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
        else:
            raise ValueError(f"expected {expected}, got {value!r}")
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a positive duration, got {_show(value)}")
    return seconds


# --- YAML with line numbers ----------------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class _List(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _Loader(yaml.SafeLoader):
    """Safe YAML loading that records line numbers and rejects repeated keys."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in first_lines:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first_lines[key]})",
                    key_node.start_mark,
                )
            first_lines[key] = _node_line(key_node)
        return super().construct_mapping(node, deep)


def _node_line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _construct_map(loader: _Loader, node: MappingNode) -> Iterator[_Map]:
    data = _Map(_node_line(node))
    yield data  # yielded first so that recursive anchors resolve, as in SafeConstructor
    data.update(loader.construct_mapping(node))
    data.key_lines = {
        loader.construct_object(key): _node_line(key)
        for key, _ in node.value
        if key.tag != _MERGE_TAG
    }


def _construct_seq(loader: _Loader, node: SequenceNode) -> Iterator[_List]:
    data = _List(_node_line(node))
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [_node_line(item) for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _read_yaml(path: Path) -> _Map:
    """Parse a recipe file into a :class:`_Map`, turning every failure into a RecipeError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("no such recipe file", path=path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError("the recipe is not UTF-8 text", path=path, line=line) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if mark is None or (exc.context_mark is not None and mark.index >= len(text.rstrip())):
            # The problem is the end of the file (an unclosed quote or bracket): point at its start.
            mark = exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = f" ({exc.context})" if exc.context and exc.problem else ""
        message = f"invalid YAML: {exc.problem or exc.context}{detail}"
        raise RecipeError(message, path=path, line=line) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        position = getattr(exc, "position", 0)
        line = text.count("\n", 0, position) + 1
        raise RecipeError(f"invalid YAML: {exc}", path=path, line=line) from None
    if not isinstance(data, _Map):
        line = data.line if isinstance(data, _List) else 1
        raise RecipeError(
            f"the top level must be a mapping with keys such as prefix:, got {_show(data)}",
            path=path,
            line=line,
        )
    return data


# --- fields --------------------------------------------------------------------------------------


def _key_line(data: Mapping[Any, Any], key: Any) -> int:
    """Line of ``key`` in a parsed mapping (its own line if the key is absent; 1 if unknown)."""
    if isinstance(data, _Map):
        return data.key_lines.get(key, data.line)
    return 1


def _item_lines(items: Sequence[Any], default: int) -> list[int]:
    if isinstance(items, _List):
        return items.item_lines
    return [default] * len(items)


def _show(value: Any) -> str:
    """A short description of a YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _check_keys(data: Mapping[Any, Any], allowed: Sequence[str], what: str, path: Path) -> None:
    """Reject keys outside ``allowed``, suggesting the closest known one."""
    for key in data:
        line = _key_line(data, key)
        if not isinstance(key, str):
            raise RecipeError(f"{what}s must be text, got {_show(key)}", path=path, line=line)
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(
                f"unknown {what} '{key}'{hint}; expected one of: {', '.join(allowed)}",
                path=path,
                line=line,
            )


def _inherit(data: Mapping[str, Any], key: str, parent: Recipe | None, own: Any) -> Any:
    """A setting's own value if the key is given, else the parent's, else the default ``own``."""
    if key in data or parent is None:
        return own
    return getattr(parent, key)


def _get_positive_int(data: Mapping[str, Any], key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(
            f"{key} must be a positive integer, got {_show(value)}",
            path=path,
            line=_key_line(data, key),
        )
    return value


def _get_bool(data: Mapping[str, Any], key: str, path: Path, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise RecipeError(
            f"{key} must be true or false, got {_show(value)}", path=path, line=_key_line(data, key)
        )
    return value


def _get_optional_text(data: Mapping[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise RecipeError(
            f"{key} must be text, got {_show(value)}", path=path, line=_key_line(data, key)
        )
    return value


def _get_text_list(
    data: Mapping[str, Any], key: str, path: Path, *, required: bool
) -> tuple[str, ...]:
    value = data.get(key)
    if value is None and not required:
        return ()
    line = _key_line(data, key)
    if not isinstance(value, list) or (required and not value):
        need = "a non-empty list" if required else "a list"
        raise RecipeError(f"{key} must be {need} of text, got {_show(value)}", path=path, line=line)
    for item, item_line in zip(value, _item_lines(value, line), strict=True):
        if not isinstance(item, str) or not item:
            raise RecipeError(
                f"each item of {key} must be non-empty text, got {_show(item)}",
                path=path,
                line=item_line,
            )
    return tuple(value)


def _parse_name(data: Mapping[str, Any], path: Path) -> str:
    name = data.get("name")
    if name is None:
        if not _NAME_RE.fullmatch(path.stem):
            raise RecipeError(
                f"the file name '{path.stem}' is not a valid recipe name; add a name: of "
                "letters, digits, '_', '.' or '-'",
                path=path,
                line=1,
            )
        return path.stem
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RecipeError(
            f"name must be letters, digits, '_', '.' or '-', got {_show(name)}",
            path=path,
            line=_key_line(data, "name"),
        )
    return name


def _parse_aliases(data: Mapping[str, Any], path: Path, name: str) -> tuple[str, ...]:
    """Other names for the recipe, unique among themselves and different from its name."""
    aliases = _get_text_list(data, "aliases", path, required=False)
    lines = _item_lines(data.get("aliases") or [], _key_line(data, "aliases"))
    seen = {name}
    for alias, line in zip(aliases, lines, strict=True):
        if not _ALIAS_RE.fullmatch(alias):
            raise RecipeError(
                f"an alias must be 1-128 letters, digits, '_', '.', ':', '/' or '-', got {alias!r}",
                path=path,
                line=line,
            )
        if alias in seen:
            what = "the recipe's name" if alias == name else "given twice"
            raise RecipeError(f"alias '{alias}' is {what}", path=path, line=line)
        seen.add(alias)
    return aliases


def _alias_line(recipe: Recipe, alias: str) -> int | None:
    """The line of ``alias`` in the recipe file (read again, for an error: recipes keep no
    line per item)."""
    try:
        data = _read_yaml(recipe.path)
    except RecipeError:
        return None
    items = data.get("aliases")
    if not isinstance(items, list) or alias not in items:
        return None
    return _item_lines(items, _key_line(data, "aliases"))[items.index(alias)]


def _parse_model(data: Mapping[str, Any], path: Path, parent: Recipe | None) -> str | None:
    if "model" not in data:
        return parent.model if parent else None
    value = data["model"]
    if value is None:
        return None
    line = _key_line(data, "model")
    if not isinstance(value, str) or not value:
        raise RecipeError(
            f"model must be the path of a GGUF file or null, got {_show(value)}",
            path=path,
            line=line,
        )
    model = _absolute(path.parent, os.path.expanduser(value))
    if not model.is_file():
        raise RecipeError(f"model: no such file '{value}'", path=path, line=line)
    return str(model)


def _parse_ttl(data: Mapping[str, Any], path: Path) -> float | None:
    try:
        return parse_duration(data.get("ttl"))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"ttl: {exc}", path=path, line=_key_line(data, "ttl")) from None


# --- tools ---------------------------------------------------------------------------------------


def _parse_tools(
    data: Mapping[str, Any], path: Path, parent: Recipe | None
) -> tuple[dict[str, Any], ...]:
    """Validate ``tools`` as OpenAI function tools with names unique across the chain."""
    value = data.get("tools")
    if value is None:
        return ()
    line = _key_line(data, "tools")
    if not isinstance(value, list):
        raise RecipeError(
            f"tools must be a list of tool schemas, got {_show(value)}", path=path, line=line
        )
    names = {tool["function"]["name"] for tool in parent.tools} if parent else set()
    tools = []
    for tool, tool_line in zip(value, _item_lines(value, line), strict=True):
        name = _check_tool(tool, tool_line, path)
        if name in names:
            raise RecipeError(f"tool '{name}' is defined twice", path=path, line=tool_line)
        names.add(name)
        tools.append(_plain_json(tool, tool_line, path))
    return tuple(tools)


def _check_tool(tool: Any, line: int, path: Path) -> str:
    """Check one tool schema and return its function name."""
    if not isinstance(tool, Mapping):
        raise RecipeError(
            f"a tool must be a mapping {{type: function, function: {{name, ...}}}}, "
            f"got {_show(tool)}",
            path=path,
            line=line,
        )
    _check_keys(tool, _TOOL_KEYS, "tool key", path)
    if tool.get("type") != "function":
        raise RecipeError(
            f"tool type must be 'function', got {_show(tool.get('type'))}",
            path=path,
            line=_key_line(tool, "type"),
        )
    function = tool.get("function")
    function_line = _key_line(tool, "function")
    if not isinstance(function, Mapping):
        raise RecipeError(
            "tool needs function: a mapping with name, description and parameters",
            path=path,
            line=function_line,
        )
    _check_keys(function, _FUNCTION_KEYS, "function key", path)
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
        raise RecipeError(
            f"tool function needs a name of 1-64 letters, digits, '_' or '-', got {_show(name)}",
            path=path,
            line=_key_line(function, "name") if "name" in function else function_line,
        )
    _get_optional_text(function, "description", path)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise RecipeError(
            f"function parameters must be a JSON schema mapping, got {_show(parameters)}",
            path=path,
            line=_key_line(function, "parameters"),
        )
    return name


def _plain_json(value: Any, line: int, path: Path) -> Any:
    """A deep copy made of plain JSON types, so tools hash and serialize the same everywhere."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeError(f"JSON keys must be text, got {_show(key)}", path=path, line=line)
            out[key] = _plain_json(item, line, path)
        return out
    if isinstance(value, list):
        return [_plain_json(item, line, path) for item in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise RecipeError(f"{_show(value)} is not a JSON value; quote it", path=path, line=line)


# --- prefix --------------------------------------------------------------------------------------


def _parse_prefix(
    data: Mapping[str, Any],
    path: Path,
    parent: Recipe | None,
    *,
    has_tools: bool,
    roots: _Roots = None,
    tool_names: Collection[str] = (),
) -> tuple[tuple[dict[str, Any], ...], tuple[IncludeSpec, ...]]:
    """The messages of ``prefix``, with each include rendered, and the include specs.

    ``tool_names`` are the functions the recipe's chain defines (a call in an OpenAI-shaped
    assistant message must name one of them, when there are any).
    """
    items = data.get("prefix")
    line = _key_line(data, "prefix") if "prefix" in data else 1
    if items is None:
        items = []
        if "prefix" not in data and parent is None:
            raise RecipeError(
                "missing required key 'prefix' (the list of messages)", path=path, line=1
            )
    if not isinstance(items, list):
        raise RecipeError(
            f"prefix must be a list of messages, got {_show(items)}", path=path, line=line
        )
    if not items and not (parent and has_tools):
        extra = " or add tools" if parent else ""
        raise RecipeError(
            f"prefix is empty: list at least one message{extra}", path=path, line=line
        )
    messages: list[dict[str, Any]] = []
    includes: list[IncludeSpec] = []
    calls = _CallIds(parent.messages if parent else [])
    for item, item_line in zip(items, _item_lines(items, line), strict=True):
        if isinstance(item, Mapping) and "role" in item:
            messages.append(_openai_message(item, item_line, path, calls, tool_names))
            continue
        role, value = _single_key(item, item_line, path)
        if role == "include":
            spec = IncludeSpec.from_dict(
                value, recipe_path=path, line=item_line, message_index=len(messages), root=roots
            )
            includes.append(spec)
            messages.append({"role": spec.role, "content": _render_include(spec, path)})
        elif isinstance(value, str) and value:
            messages.append({"role": role, "content": value})
        else:
            raise RecipeError(
                f"{role} must be non-empty text, got {_show(value)}", path=path, line=item_line
            )
    return tuple(messages), tuple(includes)


def _single_key(item: Any, line: int, path: Path) -> tuple[str, Any]:
    """The one ``key: value`` pair of a shorthand prefix item."""
    expected = ", ".join(_MESSAGE_KEYS)
    if isinstance(item, Mapping) and any(k in _OPENAI_MESSAGE_KEYS for k in item):
        raise RecipeError(
            f"an OpenAI-shaped message needs role: (one of {', '.join(_ROLES)}); got the "
            f"keys {', '.join(map(str, item))}",
            path=path,
            line=line,
        )
    if not isinstance(item, Mapping) or len(item) != 1:
        if isinstance(item, Mapping):
            got = f"{len(item)} keys ({', '.join(map(str, item))})"
        else:
            got = _show(item)
        raise RecipeError(
            f"each prefix item needs exactly one key of {expected}; got {got} "
            "(or write an OpenAI message: role:, content:, ...)",
            path=path,
            line=line,
        )
    _check_keys(item, _MESSAGE_KEYS, "prefix item key", path)
    ((key, value),) = item.items()
    return key, value


# --- OpenAI-shaped messages ----------------------------------------------------------------------


class _CallIds:
    """The tool call ids made so far along a recipe's chain, so that each tool message answers
    one of them and no id is made twice."""

    def __init__(self, inherited: Iterable[Mapping[str, Any]]) -> None:
        self.ids: list[str] = []
        for message in inherited:
            for call in message.get("tool_calls") or []:
                self.ids.append(call["id"])


def _openai_message(
    item: Mapping[str, Any],
    line: int,
    path: Path,
    calls: _CallIds,
    tool_names: Collection[str],
) -> dict[str, Any]:
    """Validate one OpenAI-shaped message; the message as a client would send it."""
    _check_keys(item, _OPENAI_MESSAGE_KEYS, "message key", path)
    role = item["role"]
    if role not in _ROLES:
        close = difflib.get_close_matches(str(role), _ROLES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(
            f"unknown role {_show(role)}{hint}; expected one of: {', '.join(_ROLES)}",
            path=path,
            line=_key_line(item, "role"),
        )
    for key, only in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
        if key in item and role != only:
            raise RecipeError(
                f"{key} belongs to {only} messages, not {role}",
                path=path,
                line=_key_line(item, key),
            )
    message: dict[str, Any] = {"role": role}
    tool_calls = _tool_calls(item, path, calls, tool_names) if "tool_calls" in item else None
    if "content" in item:
        message["content"] = _content(item, role, path, may_be_empty=bool(tool_calls))
    elif not tool_calls:
        raise RecipeError(
            f"a{'n' if role == 'assistant' else ''} {role} message needs content: text or a "
            "list of text parts" + (" (or tool_calls)" if role == "assistant" else ""),
            path=path,
            line=line,
        )
    if "name" in item:
        message["name"] = _name_field(item, path)
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    if role == "tool":
        message["tool_call_id"] = _tool_call_id(item, line, path, calls)
    return message


def _content(item: Mapping[str, Any], role: str, path: Path, *, may_be_empty: bool) -> str | None:
    """A message's content: text, or text content parts joined (as the server joins them)."""
    value = item["content"]
    line = _key_line(item, "content")
    if isinstance(value, list):
        texts = []
        for part, part_line in zip(value, _item_lines(value, line), strict=True):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                got = _show(part.get("type")) if isinstance(part, Mapping) else _show(part)
                raise RecipeError(
                    f"content parts must be {{type: text, text: ...}} (only text can be pinned), "
                    f"got {got}",
                    path=path,
                    line=part_line,
                )
            _check_keys(part, _CONTENT_PART_KEYS, "content part key", path)
            text = part.get("text")
            if not isinstance(text, str):
                raise RecipeError(
                    f"a text content part needs text:, got {_show(text)}",
                    path=path,
                    line=_key_line(part, "text"),
                )
            texts.append(text)
        value = "".join(texts)
    if value is None and may_be_empty:
        return None
    if not isinstance(value, str) or not (value or may_be_empty or role == "tool"):
        raise RecipeError(
            f"content must be non-empty text or a list of text parts, got {_show(value)}",
            path=path,
            line=line,
        )
    return value


def _name_field(item: Mapping[str, Any], path: Path) -> str:
    value = item["name"]
    if not isinstance(value, str) or not value:
        raise RecipeError(
            f"name must be non-empty text, got {_show(value)}",
            path=path,
            line=_key_line(item, "name"),
        )
    return value


def _tool_calls(
    item: Mapping[str, Any], path: Path, calls: _CallIds, tool_names: Collection[str]
) -> list[dict[str, Any]]:
    """The assistant's tool calls, each ``{id, type: function, function: {name, arguments}}``."""
    value = item["tool_calls"]
    line = _key_line(item, "tool_calls")
    if not isinstance(value, list) or not value:
        raise RecipeError(
            f"tool_calls must be a non-empty list of calls, got {_show(value)}",
            path=path,
            line=line,
        )
    out = []
    for call, call_line in zip(value, _item_lines(value, line), strict=True):
        if not isinstance(call, Mapping):
            raise RecipeError(
                f"a tool call must be a mapping {{id, type: function, function: {{name, "
                f"arguments}}}}, got {_show(call)}",
                path=path,
                line=call_line,
            )
        _check_keys(call, _TOOL_CALL_KEYS, "tool call key", path)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RecipeError(
                f"a tool call needs id: non-empty text, got {_show(call_id)}",
                path=path,
                line=_key_line(call, "id") if "id" in call else call_line,
            )
        if call_id in calls.ids:
            raise RecipeError(
                f"tool call id '{call_id}' is used twice", path=path, line=_key_line(call, "id")
            )
        if call.get("type") != "function":
            raise RecipeError(
                f"tool call type must be 'function', got {_show(call.get('type'))}",
                path=path,
                line=_key_line(call, "type") if "type" in call else call_line,
            )
        function = call.get("function")
        function_line = _key_line(call, "function") if "function" in call else call_line
        if not isinstance(function, Mapping):
            raise RecipeError(
                "a tool call needs function: a mapping with name and arguments",
                path=path,
                line=function_line,
            )
        _check_keys(function, _CALL_FUNCTION_KEYS, "tool call function key", path)
        name = function.get("name")
        name_line = _key_line(function, "name") if "name" in function else function_line
        if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
            raise RecipeError(
                f"a tool call's function needs a name of 1-64 letters, digits, '_' or '-', "
                f"got {_show(name)}",
                path=path,
                line=name_line,
            )
        if tool_names and name not in tool_names:
            raise RecipeError(
                f"the call names the function '{name}', which is not among the recipe's tools "
                f"({', '.join(sorted(tool_names))})",
                path=path,
                line=name_line,
            )
        calls.ids.append(call_id)
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": _arguments(function, path, name_line)},
            }
        )
    return out


def _arguments(function: Mapping[str, Any], path: Path, default_line: int) -> str:
    """A call's arguments as JSON text: given as text (kept as written) or as a mapping."""
    if "arguments" not in function:
        raise RecipeError(
            "a tool call's function needs arguments: JSON text or a mapping",
            path=path,
            line=default_line,
        )
    value = function["arguments"]
    line = _key_line(function, "arguments")
    if isinstance(value, Mapping):
        return json.dumps(_plain_json(value, line, path))
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise RecipeError(f"arguments is not valid JSON: {exc}", path=path, line=line) from None
        if isinstance(parsed, dict):
            return value
    raise RecipeError(
        f"arguments must be a JSON object (as text or a mapping), got {_show(value)}",
        path=path,
        line=line,
    )


def _tool_call_id(item: Mapping[str, Any], line: int, path: Path, calls: _CallIds) -> str:
    value = item.get("tool_call_id")
    if not isinstance(value, str) or not value:
        raise RecipeError(
            "a tool message needs tool_call_id: the id of the call it answers"
            + (f", got {_show(value)}" if "tool_call_id" in item else ""),
            path=path,
            line=_key_line(item, "tool_call_id") if "tool_call_id" in item else line,
        )
    if value not in calls.ids:
        made = f" (calls made: {', '.join(calls.ids)})" if calls.ids else " (none is made)"
        raise RecipeError(
            f"tool_call_id '{value}' answers no earlier tool call{made}",
            path=path,
            line=_key_line(item, "tool_call_id"),
        )
    return value


# --- include -------------------------------------------------------------------------------------


class _IgnoreRules:
    """Which globbed files an include skips: .gitignore files, then the include's own ignore list.

    As in git, a later or deeper pattern overrides an earlier one, so ``!keep.py`` re-includes.
    """

    def __init__(self, folder: Path, ignore: Sequence[str], *, use_gitignore: bool) -> None:
        self._folder = folder
        self._ignore = pathspec.GitIgnoreSpec.from_lines(ignore)
        self._use_gitignore = use_gitignore
        self._specs: dict[Path, pathspec.GitIgnoreSpec | None] = {}

    def ignores(self, file: Path) -> bool:
        ignored = False
        if self._use_gitignore:
            for folder in self._gitignore_folders(file):
                spec = self._gitignore(folder)
                if spec is not None:
                    ignored = _decide(spec, _display_path(file, folder), ignored)
        return _decide(self._ignore, _display_path(file, self._folder), ignored)

    def _gitignore_folders(self, file: Path) -> list[Path]:
        """Folders whose .gitignore applies to ``file``, outermost first.

        Up to the git root holding the file; outside git, up to the folder that holds both the
        file and the recipe, so that stray .gitignore files higher up do not count.
        """
        chain = [file.parent, *file.parent.parents]
        for index, folder in enumerate(chain):
            if (folder / ".git").exists():
                return chain[index::-1]
        for index, folder in enumerate(chain):
            if self._folder.is_relative_to(folder):
                return chain[index::-1]
        return [file.parent]

    def _gitignore(self, folder: Path) -> pathspec.GitIgnoreSpec | None:
        if folder not in self._specs:
            gitignore = folder / ".gitignore"
            lines = (
                gitignore.read_text("utf-8", "replace").splitlines() if gitignore.is_file() else []
            )
            self._specs[folder] = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        return self._specs[folder]


def _decide(spec: pathspec.GitIgnoreSpec, relpath: str, ignored: bool) -> bool:
    """Apply one set of gitignore patterns on top of the decision so far."""
    decision = spec.check_file(relpath).include
    return ignored if decision is None else decision


def _resolve_files(
    patterns: list[Any], rules: _IgnoreRules, recipe_path: Path, roots: _Roots = None
) -> tuple[Path, ...]:
    """Absolute paths of the files an include names, deduplicated, in render order.

    A plain path is taken as named; a glob (``*``, ``?``, ``[``; ``**`` recurses, names starting
    with a dot are skipped) keeps the files the ignore rules allow, and must keep at least one.
    With ``roots``, a file that resolves outside them is an error, not skipped: the recipe would
    not render what its author wrote.
    """
    folder = recipe_path.parent
    found: set[Path] = set()
    for pattern, line in zip(patterns, _item_lines(patterns, 1), strict=True):
        if _GLOB_RE.search(pattern):
            matches = [
                _absolute(folder, m) for m in glob.glob(pattern, root_dir=folder, recursive=True)
            ]
            files = [m for m in matches if m.is_file()]
            kept = [f for f in files if not rules.ignores(f)]
            if not kept:
                why = "files that are not ignored" if files else "files"
                raise RecipeError(
                    f"include pattern '{pattern}' matches no {why}", path=recipe_path, line=line
                )
            for file in kept:
                _confine(file, roots, "include", recipe_path, line, _display_path(file, folder))
            found.update(kept)
        else:
            file = _absolute(folder, pattern)
            _confine(file, roots, "include", recipe_path, line, pattern)
            if file.is_dir():
                raise RecipeError(
                    f"include: '{pattern}' is a folder; use '{pattern}/**' for the files in it",
                    path=recipe_path,
                    line=line,
                )
            if not file.is_file():
                raise RecipeError(f"include: no such file '{pattern}'", path=recipe_path, line=line)
            found.add(file)
    return tuple(sorted(found, key=lambda f: _display_path(f, folder)))


def _render_include(spec: IncludeSpec, recipe_path: Path) -> str:
    """The include's message: its header, then one fenced block per file."""
    folder = recipe_path.parent
    _check_max_bytes(spec, recipe_path)
    blocks = [spec.header.rstrip("\n") + "\n"] if spec.header else []
    for file in spec.files:
        shown = _display_path(file, folder)
        blocks.append(_file_block(shown, _read_text(file, shown, recipe_path, spec.line)))
    return "\n".join(blocks)


def _check_max_bytes(spec: IncludeSpec, recipe_path: Path) -> None:
    # Sizes come from stat, so a huge file is refused before it is read.
    if spec.max_bytes is None:
        return
    sizes = {file: file.stat().st_size for file in spec.files}
    total = sum(sizes.values())
    if total > spec.max_bytes:
        largest = max(sizes, key=lambda f: sizes[f])
        raise RecipeError(
            f"include's {len(sizes)} files total {total} bytes, more than max_bytes "
            f"{spec.max_bytes} (largest: {_display_path(largest, recipe_path.parent)}, "
            f"{sizes[largest]} bytes); narrow paths, add ignore patterns or raise max_bytes",
            path=recipe_path,
            line=spec.line,
        )


def _read_text(file: Path, shown: str, recipe_path: Path, line: int) -> str:
    """An included file's text; binary and non-UTF-8 files are errors, not mojibake."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise RecipeError(
            f"include: cannot read '{shown}': {exc.strerror}", path=recipe_path, line=line
        ) from None
    if b"\0" in data:
        raise RecipeError(
            f"include: '{shown}' is a binary file; ignore it or narrow paths",
            path=recipe_path,
            line=line,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"include: '{shown}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})",
            path=recipe_path,
            line=line,
        ) from None


def _file_block(shown: str, text: str) -> str:
    """``### path`` and the text in a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if not text or text.endswith("\n") else text + "\n"
    return f"### {shown}\n{fence}\n{body}{fence}\n"


def _roots(root: RecipeRoot) -> _Roots:
    """``root`` as resolved folders (symlinks followed, so that resolved files compare)."""
    if root is None:
        return None
    if isinstance(root, (str, os.PathLike)):
        root = [root]
    return tuple(Path(r).expanduser().resolve() for r in root)


def _confine(
    file: Path, roots: _Roots, what: str, path: Path, line: int | None, name: str | None = None
) -> None:
    """Refuse ``file`` unless it resolves, after symlinks, under one of ``roots``.

    Checked before the file's existence, so that errors do not tell whether a file outside the
    roots exists. The check happens at load time: it keeps a recipe from naming files outside
    the roots, not someone who can swap files while the loader runs.
    """
    if roots is None:
        return
    real = file.resolve()
    if any(real.is_relative_to(r) for r in roots):
        return
    shown = " or ".join(str(r) for r in roots)
    via = f" (it resolves to {real})" if real != Path(os.path.abspath(file)) else ""
    raise RecipeError(
        f"{what}: '{name or file}' is outside the recipe root {shown}{via}; only files under the "
        "root may be read",
        path=path,
        line=line,
    )


def _absolute(folder: Path, name: str) -> Path:
    """``name`` relative to ``folder`` (or absolute), with ``..`` folded but symlinks kept."""
    return Path(os.path.normpath(folder / name))


def _display_path(file: Path, folder: Path) -> str:
    """``file`` as a POSIX path relative to ``folder``; used for sorting and for headings."""
    try:
        return Path(os.path.relpath(file, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return file.as_posix()


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
