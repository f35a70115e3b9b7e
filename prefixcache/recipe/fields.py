"""Validation of a recipe's top-level fields (name, aliases, model, n_ctx, pinned, ttl, autosave)
and of its tool schemas; the shared checks (known keys, types) the other modules use.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from .paths import _absolute
from .yaml import _item_lines, _key_line, _read_yaml, _show

if TYPE_CHECKING:
    from .model import Recipe


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
_TOOL_KEYS = ("type", "function")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ALIAS_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SECONDS_RE = re.compile(r"\d+(?:\.\d+)?")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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


_MODEL_KEYS = ("path", "chat_template", "chat_format")


def _parse_model(data: Mapping[str, Any], path: Path, parent: Recipe | None) -> str | None:
    """The model file: ``model: file.gguf``, or ``model: {path: file.gguf, ...}``."""
    if "model" not in data:
        return parent.model if parent else None
    value = data["model"]
    line = _key_line(data, "model")
    if isinstance(value, Mapping):
        _check_keys(value, _MODEL_KEYS, "model key", path)
        value = value.get("path")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RecipeError(
            "model must be the path of a GGUF file, null, or a mapping with path, "
            f"chat_template and chat_format; got {_show(value)}",
            path=path,
            line=line,
        )
    model = _absolute(path.parent, os.path.expanduser(value))
    if not model.is_file():
        raise RecipeError(f"model: no such file '{value}'", path=path, line=line)
    return str(model)


def _parse_chat(
    data: Mapping[str, Any], path: Path, parent: Recipe | None
) -> tuple[str | None, str | None]:
    """``(chat_template, chat_format)`` from the model section: a template file (relative to
    the recipe) or a llama-cpp-python format name; inherited with the model."""
    section = data.get("model")
    if not isinstance(section, Mapping):
        if "model" in data:
            return None, None
        return (parent.chat_template, parent.chat_format) if parent else (None, None)
    template = section.get("chat_template")
    chat_format = section.get("chat_format")
    line = _key_line(data, "model")
    for key, value in (("chat_template", template), ("chat_format", chat_format)):
        if value is not None and (not isinstance(value, str) or not value):
            raise RecipeError(f"model.{key} must be text, got {_show(value)}", path=path, line=line)
    if template and chat_format:
        raise RecipeError(
            "model: give chat_template or chat_format, not both", path=path, line=line
        )
    if template:
        file = _absolute(path.parent, os.path.expanduser(template))
        if not file.is_file():
            raise RecipeError(
                f"model.chat_template: no such file '{template}'", path=path, line=line
            )
        template = str(file)
    return template, chat_format


def _parse_ttl(data: Mapping[str, Any], path: Path) -> float | None:
    try:
        return parse_duration(data.get("ttl"))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"ttl: {exc}", path=path, line=_key_line(data, "ttl")) from None


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
