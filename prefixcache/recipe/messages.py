"""A recipe's ``prefix``: shorthand items (one key of system, user, assistant, include) and
OpenAI-shaped messages (role, content, name, tool_calls, tool_call_id), validated and
normalised as the server would see them.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from .fields import _TOOL_NAME_RE, _check_keys, _plain_json
from .include import IncludeSpec, _render_include
from .paths import _Roots
from .yaml import _item_lines, _key_line, _show

if TYPE_CHECKING:
    from .model import Recipe


_MESSAGE_KEYS = ("system", "user", "assistant", "include")
_OPENAI_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CONTENT_PART_KEYS = ("type", "text")
_TOOL_CALL_KEYS = ("id", "type", "function")
_CALL_FUNCTION_KEYS = ("name", "arguments")


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
