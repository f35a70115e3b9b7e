"""Anthropic's Messages API, checked and mapped onto the OpenAI-shaped chat the library runs.

Pure data (no model, no I/O): :func:`parse_messages_request` checks a ``POST /v1/messages`` body
and gives a :class:`MessagesRequest`, or raises :class:`~prefixcache.errors.RequestError` naming
the field; :meth:`MessagesRequest.chat` is the same conversation as OpenAI chat messages, tools and
``tool_choice`` (what :func:`prefixcache.request.normalise_chat` takes), so both APIs share one
generation path, one chat template rendering and one constrained decoding.

The mapping: the system prompt (a string or text blocks) is one system message; a user message's
``tool_result`` blocks become ``tool`` messages (in block order, text blocks between them user
messages); an assistant message's ``tool_use`` blocks become its ``tool_calls``. Text blocks of one
message are joined with a blank line. ``thinking`` blocks in the history are dropped (a local model
neither made nor reads them); images, documents and server tools are refused.

``cache_control`` on a tool, a system block or a content block is a :class:`Breakpoint`; the
prefix it covers is found at token level by :mod:`prefixcache.server.breakpoints`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RequestError

#: cache_control TTLs Anthropic accepts, in seconds (before the server's TTL scale).
TTLS = {"5m": 300.0, "1h": 3600.0}
#: The most cache_control breakpoints one request may carry (as Anthropic).
MAX_BREAKPOINTS = 4
#: Joins the text blocks of one message (and of the system prompt).
BLOCK_SEPARATOR = "\n\n"

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_UNSUPPORTED_BLOCKS = {
    "image": "images",
    "document": "documents",
    "search_result": "search results",
    "container_upload": "container uploads",
}
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")
_TOOL_CHOICES = ("auto", "any", "tool", "none")


@dataclass(frozen=True)
class Breakpoint:
    """A ``cache_control`` marker: the prefix up to and including one block is to be pinned.

    ``kind`` is ``tool``, ``system`` or ``message``; ``index`` the tool, system block or message;
    ``block`` the content block within a message (-1 otherwise).
    """

    kind: str
    index: int
    block: int
    ttl: str  # "5m" or "1h"

    @property
    def where(self) -> str:
        if self.kind == "tool":
            return f"tools[{self.index}]"
        if self.kind == "system":
            return f"system[{self.index}]"
        return f"messages[{self.index}].content[{self.block}]"


@dataclass(frozen=True)
class MessagesRequest:
    """A checked Messages request. ``messages`` hold normalised blocks: ``text``
    ``{text}``, ``tool_use`` ``{id, name, input}``, ``tool_result`` ``{tool_use_id, content,
    is_error}`` (content as text)."""

    model: str
    max_tokens: int | None
    messages: list[dict[str, Any]]
    system: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: OpenAI's form: "auto", "none", "required" or {"type": "function", ...}; None: default.
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    stop_sequences: list[str] = field(default_factory=list)
    stream: bool = False
    #: temperature, top_p, top_k as given (llama-cpp-python's defaults for the rest).
    sampling: dict[str, Any] = field(default_factory=dict)
    breakpoints: list[Breakpoint] = field(default_factory=list)
    #: OpenAI's ``response_format`` for ``output_config.format`` (JSON by grammar), or None.
    response_format: dict[str, Any] | None = None

    def chat(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The conversation as OpenAI chat messages and function tools."""
        return openai_messages(self.system, self.messages), openai_tools(self.tools)

    def with_parts(
        self,
        *,
        tools: list[dict[str, Any]] | None = None,
        system: list[str] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> MessagesRequest:
        """A copy with other tools, system blocks or messages (for probing boundaries)."""
        return replace(
            self,
            tools=self.tools if tools is None else tools,
            system=self.system if system is None else system,
            messages=self.messages if messages is None else messages,
        )


# --- conversion to the OpenAI shape --------------------------------------------------------------


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def openai_messages(system: list[str], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": BLOCK_SEPARATOR.join(system)})
    for message in messages:
        out.extend(_openai_message(message))
    return out


def _openai_message(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = message["content"]
    if message["role"] == "assistant":
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        calls = [
            {
                "id": b["id"],
                "type": "function",
                "function": {"name": b["name"], "arguments": json.dumps(b["input"])},
            }
            for b in blocks
            if b["type"] == "tool_use"
        ]
        msg: dict[str, Any] = {"role": "assistant", "content": BLOCK_SEPARATOR.join(texts)}
        if calls:
            msg["tool_calls"] = calls
            msg["content"] = msg["content"] or None
        return [msg]
    out: list[dict[str, Any]] = []
    parts: list[str] = []
    for block in blocks:
        if block["type"] == "text":
            parts.append(block["text"])
            continue
        if parts:
            out.append({"role": "user", "content": BLOCK_SEPARATOR.join(parts)})
            parts = []
        content = block["content"]
        if block["is_error"]:
            content = "Error: " + content
        out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
    if parts or not out:
        out.append({"role": "user", "content": BLOCK_SEPARATOR.join(parts)})
    return out


# --- checking ---------------------------------------------------------------------------------


def _ttl(value: Any, where: str) -> str | None:
    """The TTL of a ``cache_control`` value (None when there is none)."""
    if value is None:
        return None
    at = f"{where}.cache_control"
    if not isinstance(value, Mapping) or value.get("type") != "ephemeral":
        raise RequestError(f'{at} must be {{"type": "ephemeral"}} (with an optional ttl)', at)
    ttl = value.get("ttl", "5m")
    if ttl not in TTLS:
        raise RequestError(f"{at}.ttl must be '5m' or '1h', not {ttl!r}", f"{at}.ttl")
    return str(ttl)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string", where)
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RequestError(f"{where} must be an object", where)
    return value


def _block_type(block: Mapping[str, Any], where: str) -> str:
    kind = block.get("type")
    if kind in _UNSUPPORTED_BLOCKS:
        raise RequestError(
            f"{where}: {_UNSUPPORTED_BLOCKS[kind]} are not supported: this server's models "
            "read text only (send the text instead)",
            f"{where}.type",
        )
    if not isinstance(kind, str):
        raise RequestError(f"{where}.type is required", f"{where}.type")
    return kind


def _tool_result_content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a string or a list of text blocks", where)
    texts = []
    for j, block in enumerate(value):
        at = f"{where}[{j}]"
        block = _object(block, at)
        kind = _block_type(block, at)
        if kind != "text":
            raise RequestError(f"{at}: a tool_result holds text blocks only, not {kind!r}", at)
        texts.append(_text(block.get("text"), f"{at}.text"))
    return BLOCK_SEPARATOR.join(texts)


def _blocks(
    content: Any, role: str, where: str, index: int, marks: list[Breakpoint]
) -> list[dict[str, Any]]:
    """A message's content as normalised blocks; breakpoints found are added to ``marks``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content blocks", where)
    out: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        at = f"{where}[{j}]"
        block = _object(raw, at)
        kind = _block_type(block, at)
        if kind in _DROPPED_BLOCKS and role == "assistant":
            continue  # documented: thinking from another model's turn is not replayed
        if kind == "text":
            norm: dict[str, Any] = {"type": "text", "text": _text(block.get("text"), f"{at}.text")}
        elif kind == "tool_use" and role == "assistant":
            call_id = _text(block.get("id"), f"{at}.id")
            name = _text(block.get("name"), f"{at}.name")
            args = block.get("input", {})
            if not isinstance(args, Mapping):
                raise RequestError(f"{at}.input must be an object", f"{at}.input")
            norm = {"type": "tool_use", "id": call_id, "name": name, "input": dict(args)}
        elif kind == "tool_result" and role == "user":
            call_id = _text(block.get("tool_use_id"), f"{at}.tool_use_id")
            if not call_id:
                raise RequestError(f"{at}.tool_use_id must not be empty", f"{at}.tool_use_id")
            norm = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": _tool_result_content(block.get("content"), f"{at}.content"),
                "is_error": bool(block.get("is_error", False)),
            }
        elif kind in ("tool_use", "tool_result", *_DROPPED_BLOCKS):
            expected = "an assistant" if kind != "tool_result" else "a user"
            raise RequestError(f"{at}: {kind} blocks belong in {expected} message", at)
        else:
            raise RequestError(
                f"{at}: content blocks of type {kind!r} are not supported (text, tool_use, "
                "tool_result; thinking blocks in assistant messages are ignored)",
                f"{at}.type",
            )
        ttl = _ttl(block.get("cache_control"), at)
        if ttl is not None:
            marks.append(Breakpoint("message", index, len(out), ttl))
        out.append(norm)
    return out


def _messages(value: Any, marks: list[Breakpoint]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of messages", "messages")
    out = []
    for i, raw in enumerate(value):
        at = f"messages[{i}]"
        message = _object(raw, at)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise RequestError(
                f"{at}.role must be 'user' or 'assistant', not {role!r} (the system prompt goes "
                "in the top-level system field)",
                f"{at}.role",
            )
        if "content" not in message:
            raise RequestError(f"{at}.content is required", f"{at}.content")
        blocks = _blocks(message["content"], role, f"{at}.content", i, marks)
        out.append({"role": role, "content": blocks})
    return out


def _system(value: Any, marks: list[Breakpoint]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list):
        raise RequestError("system must be a string or a list of text blocks", "system")
    out: list[str] = []
    for j, raw in enumerate(value):
        at = f"system[{j}]"
        block = _object(raw, at)
        if _block_type(block, at) != "text":
            raise RequestError(f"{at}: the system prompt holds text blocks only", f"{at}.type")
        ttl = _ttl(block.get("cache_control"), at)
        if ttl is not None:
            marks.append(Breakpoint("system", len(out), -1, ttl))
        out.append(_text(block.get("text"), f"{at}.text"))
    return out


def _tools(value: Any, marks: list[Breakpoint]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError("tools must be a list of tools", "tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(value):
        at = f"tools[{i}]"
        tool = _object(raw, at)
        kind = tool.get("type", "custom")
        if kind not in ("custom", None):
            raise RequestError(
                f"{at}: server tools ({kind!r}) are not supported; define a custom tool with "
                "name, description and input_schema",
                f"{at}.type",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise RequestError(
                f"{at}.name must be 1 to 128 letters, digits, '_' or '-'", f"{at}.name"
            )
        if name in seen:
            raise RequestError(f"{at}: two tools are named {name!r}", f"{at}.name")
        seen.add(name)
        description = tool.get("description")
        if description is not None:
            _text(description, f"{at}.description")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping) or schema.get("type") != "object":
            raise RequestError(
                f"{at}.input_schema must be a JSON schema of type 'object'",
                f"{at}.input_schema",
            )
        ttl = _ttl(tool.get("cache_control"), at)
        if ttl is not None:
            marks.append(Breakpoint("tool", i, -1, ttl))
        out.append({"name": name, "description": description, "input_schema": dict(schema)})
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[Any, bool | None]:
    """``tool_choice`` in OpenAI's form, and ``parallel_tool_calls``."""
    if value is None:
        return None, None
    choice = _object(value, "tool_choice")
    kind = choice.get("type")
    if kind not in _TOOL_CHOICES:
        raise RequestError(
            f"tool_choice.type must be one of {', '.join(_TOOL_CHOICES)}, not {kind!r}",
            "tool_choice.type",
        )
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError(
            "tool_choice.disable_parallel_tool_use must be true or false",
            "tool_choice.disable_parallel_tool_use",
        )
    parallel_calls = None if parallel is None else not parallel
    if kind == "none":
        return "none", parallel_calls
    if kind == "auto":
        return "auto", parallel_calls
    if not tools:
        raise RequestError(f"tool_choice {kind!r} needs tools", "tool_choice")
    if kind == "any":
        return "required", parallel_calls
    name = choice.get("name")
    names = [t["name"] for t in tools]
    if name not in names:
        raise RequestError(
            f"tool_choice.name must name one of the tools ({', '.join(names)}), not {name!r}",
            "tool_choice.name",
        )
    return {"type": "function", "function": {"name": name}}, parallel_calls


def _number(body: Mapping[str, Any], name: str, low: float, high: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number", name)
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{name} must be {span}", name)
    return value


def _output_format(value: Any) -> dict[str, Any] | None:
    """``output_config.format`` (a JSON schema the reply must match) as a response_format."""
    if value is None:
        return None
    fmt = _object(value, "output_config").get("format")
    if fmt is None:
        return None
    fmt = _object(fmt, "output_config.format")
    schema = fmt.get("schema")
    if fmt.get("type") != "json_schema" or not isinstance(schema, Mapping):
        raise RequestError(
            'output_config.format must be {"type": "json_schema", "schema": {...}}',
            "output_config.format",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": dict(schema)}}


def parse_messages_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    """Check a Messages request body (``count_only``: a ``count_tokens`` body, no max_tokens).

    Raises RequestError naming the field for anything malformed or unsupported.
    """
    body = _object(body, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required", "model")
    max_tokens = body.get("max_tokens")
    if not count_only:
        if max_tokens is None:
            raise RequestError("max_tokens is required", "max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer", "max_tokens")
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping) and thinking.get("type") not in (None, "disabled"):
        raise RequestError(
            "extended thinking is not supported by this server; leave thinking out", "thinking"
        )
    marks: list[Breakpoint] = []
    tools = _tools(body.get("tools"), marks)
    system = _system(body.get("system"), marks)
    messages = _messages(body.get("messages"), marks)
    # Top-level cache_control marks the last block of the last message.
    ttl = _ttl(body.get("cache_control"), "body")
    last = len(messages) - 1
    if ttl is not None and messages[last]["content"]:
        mark = Breakpoint("message", last, len(messages[last]["content"]) - 1, ttl)
        if all((m.kind, m.index, m.block) != (mark.kind, mark.index, mark.block) for m in marks):
            marks.append(mark)
    if len(marks) > MAX_BREAKPOINTS:
        raise RequestError(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(marks)}.",
            "cache_control",
        )
    tool_choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop_sequences must be a list of non-empty strings", "stop_sequences")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    sampling: dict[str, Any] = {}
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0), ("top_k", 0, None)):
        value = _number(body, name, low, high)
        if value is not None:
            sampling[name] = int(value) if name == "top_k" else float(value)
    return MessagesRequest(
        response_format=_output_format(body.get("output_config")),
        model=model,
        max_tokens=max_tokens if not count_only else None,
        messages=messages,
        system=system,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        stop_sequences=list(stops),
        stream=stream,
        sampling=sampling,
        breakpoints=marks,
    )


__all__ = [
    "BLOCK_SEPARATOR",
    "MAX_BREAKPOINTS",
    "TTLS",
    "Breakpoint",
    "MessagesRequest",
    "openai_messages",
    "openai_tools",
    "parse_messages_request",
]
