"""What OpenAI clients send, checked and normalised once for the Python API and the server alike.

:func:`normalise_chat` takes a chat request as OpenAI's chat-completions API defines it (messages
with content-part lists, the ``developer`` role, ``tools``/``tool_choice``,
``max_completion_tokens``, ``parallel_tool_calls``, ``response_format``, and fields that mean
nothing to a local model such as ``user``, ``metadata`` and ``store``) and gives back a
:class:`ChatCall` that the generation path uses, or raises :class:`RequestError` saying which
field is wrong and why. The server answers that error with an HTTP 400 in OpenAI's error shape.

Messages and tools are checked but otherwise passed on as they came (only content-part lists are
joined): the prompt tokens, and so what a pinned prefix matches, are those of what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
#: Request fields that are accepted and ignored: they mean nothing to a local model.
IGNORED_FIELDS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
)
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolChoice:
    """``mode`` is none, auto or required; ``name`` the one function a named choice forces."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode == "required"


@dataclass(frozen=True)
class ChatCall:
    """A checked chat request (see :func:`normalise_chat`)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    #: The rest, for ``Llama.create_chat_completion`` (``max_tokens`` resolved).
    options: dict[str, Any] = field(default_factory=dict)


def text_content(value: Any, where: str = "content") -> str | None:
    """Message content as a string: text parts are joined (without separator)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise RequestError(f"{at} must be an object with a type", at)
        kind = part.get("type")
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("text", "refusal"):
            raise RequestError(
                f"{at}: content parts of type {kind!r} are not supported (text only)", at
            )
        text = part.get(key)
        if not isinstance(text, str):
            raise RequestError(f"{at}.{key} must be a string", f"{at}.{key}")
        texts.append(text)
    return "".join(texts)


def _tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be a list", where)
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, Mapping):
            raise RequestError(f"{at} must be an object", at)
        if call.get("type", "function") != "function":
            raise RequestError(f"{at}.type must be 'function'", f"{at}.type")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise RequestError(f"{at}.function is required", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{at}.function.name is required", f"{at}.function.name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str | Mapping):
            raise RequestError(
                f"{at}.function.arguments must be a JSON string", f"{at}.function.arguments"
            )


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages, checked, with content-part lists joined into strings."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise RequestError("messages must be a list of messages", "messages")
    if not messages:
        raise RequestError("messages must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{at} must be an object with a role", at)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{at}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}",
                f"{at}.role",
            )
        msg = dict(message)
        if "content" in msg:
            msg["content"] = text_content(msg["content"], f"{at}.content")
        calls = msg.get("tool_calls")
        if role == "assistant" and calls is not None:
            _tool_calls(calls, f"{at}.tool_calls")
        elif calls:
            raise RequestError(f"{at}: only assistant messages carry tool_calls", f"{at}")
        if msg.get("content") is None and not (
            role == "assistant" and (calls or msg.get("function_call"))
        ):
            raise RequestError(f"{at}.content is required", f"{at}.content")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(
                    f"{at}: a tool message needs the tool_call_id of the call it answers",
                    f"{at}.tool_call_id",
                )
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestError(f"{at}.name must be a string", f"{at}.name")
        out.append(msg)
    return out


def normalise_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The tools, checked (each a function with a name and an object schema), or None."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise RequestError("tools must be a list of tools", "tools")
    if not tools:
        return None
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise RequestError(f"{at} must be an object", at)
        if tool.get("type") != "function":
            raise RequestError(f"{at}.type must be 'function'", f"{at}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise RequestError(f"{at}.function is required", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{at}.function.name is required", f"{at}.function.name")
        if name in seen:
            raise RequestError(f"{at}: two tools are named {name!r}", f"{at}.function.name")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(
                f"{at}.function.description must be a string", f"{at}.function.description"
            )
        params = function.get("parameters")
        if params is not None and (
            not isinstance(params, Mapping) or params.get("type", "object") != "object"
        ):
            raise RequestError(
                f"{at}.function.parameters must be a JSON schema of type 'object'",
                f"{at}.function.parameters",
            )
        out.append(dict(tool))
    return out


def normalise_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """``tool_choice`` as a :class:`ToolChoice`; the default is auto with tools, else none."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise RequestError(
                f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function, "
                f"not {choice!r}",
                "tool_choice",
            )
        if choice == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools", "tool_choice")
        return ToolChoice(choice if tools else "none")
    if not isinstance(choice, Mapping) or choice.get("type", "function") != "function":
        raise RequestError(
            'tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("tool_choice.function.name is required", "tool_choice.function.name")
    names = [t["function"]["name"] for t in tools or ()]
    if name not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        raise RequestError(
            f"tool_choice names the function {name!r}, which is not in tools (tools: {known})",
            "tool_choice.function.name",
        )
    return ToolChoice("required", name)


def normalise_response_format(value: Any) -> dict[str, Any] | None:
    """``response_format``: text (None), ``json_object`` or ``json_schema`` with its schema."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError("response_format must be an object with a type", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        if schema is not None and not isinstance(schema, Mapping):
            raise RequestError("response_format.schema must be an object", "response_format")
        return dict(value)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise RequestError(
                "response_format.json_schema must be an object with a schema",
                "response_format.json_schema",
            )
        return dict(value)
    raise RequestError(
        f"response_format.type must be text, json_object or json_schema, not {kind!r}",
        "response_format.type",
    )


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{name} must be a positive integer", name)
    return value


def normalise_chat(
    messages: Any,
    tools: Any = None,
    *,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: Any = None,
    max_completion_tokens: int | None = None,
    functions: Any = None,
    function_call: Any = None,
    **options: Any,
) -> ChatCall:
    """Check a chat request and resolve what OpenAI clients send into one :class:`ChatCall`.

    ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens`` (the smaller wins if both
    are given); the legacy ``functions``/``function_call`` become ``tools``/``tool_choice``;
    :data:`IGNORED_FIELDS` are dropped; ``n`` must be 1. The remaining options are passed on to
    ``Llama.create_chat_completion``.
    """
    if functions is not None and tools is None:
        if not isinstance(functions, list):
            raise RequestError("functions must be a list", "functions")
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call is not None and tool_choice is None:
        tool_choice = (
            {"type": "function", "function": function_call}
            if isinstance(function_call, Mapping)
            else function_call
        )
    msgs = normalise_messages(messages)
    tool_list = normalise_tools(tools)
    choice = normalise_tool_choice(tool_choice, tool_list)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    fmt = normalise_response_format(response_format)
    for name in IGNORED_FIELDS:
        options.pop(name, None)
    n = options.pop("n", None)
    if n not in (None, 1):
        raise RequestError("n must be 1: one choice per request", "n")
    limit = _positive(max_completion_tokens, "max_completion_tokens")
    if limit is not None:
        # max_tokens <= 0 or None means "up to the context" to llama-cpp-python.
        max_tokens = options.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0:
            limit = min(limit, max_tokens)
        options["max_tokens"] = limit
    stream_options = options.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, Mapping):
        raise RequestError("stream_options must be an object", "stream_options")
    return ChatCall(
        messages=msgs,
        tools=tool_list,
        tool_choice=choice,
        parallel_tool_calls=True if parallel_tool_calls is None else parallel_tool_calls,
        response_format=fmt,
        options=options,
    )


def arguments_object(arguments: Any) -> Any:
    """A call's ``arguments`` as an object when it is a JSON string of one (else unchanged)."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


__all__ = [
    "IGNORED_FIELDS",
    "ROLES",
    "ChatCall",
    "RequestError",
    "ToolChoice",
    "normalise_chat",
    "normalise_messages",
    "normalise_response_format",
    "normalise_tool_choice",
    "normalise_tools",
    "text_content",
]
