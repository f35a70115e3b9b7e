"""OpenAI's Responses API (``POST /v1/responses``), the default of the OpenAI Agents SDK.

A Responses request is mapped onto the chat request the chat-completions endpoint runs (the same
:func:`~prefixcache.request.normalise_chat` checks, the same tool-call parsing and constrained
decoding, the same prefix cache): ``instructions`` become a system message, input items become
chat messages (``function_call`` an assistant message's ``tool_calls``, ``function_call_output``
a tool message), function tools become chat tools, ``text.format`` becomes ``response_format``
and ``max_output_tokens`` becomes ``max_tokens``. The chat chunks it streams are turned into
Responses output items and typed events by :class:`ResponseBuilder`
(:mod:`.response_events`). A conversation continues by ``previous_response_id`` from
:class:`~prefixcache.server.response_events.ResponseMemory`: the tenant's recent responses, kept
in this process's memory (see docs/server.md, "Responses API").
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..request import ChatCall, RequestError, normalise_chat
from .core import Server
from .response_events import ResponseBuilder, ResponseMemory, StoredResponse, as_chunks
from .schema import APIError, api_error
from .worker import ClientGone, capped, collect_call, stream_call

log = logging.getLogger(__name__)

#: The ``api`` label of this endpoint's calls on ``/metrics``.
API = "/v1/responses"
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponsesRequest(BaseModel):
    """A Responses API request; fields that mean nothing to a local model (``include``,
    ``reasoning``, ``truncation``, ``service_tier``, ``user``...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    #: OpenAI-side state this server does not have: refused, not ignored (see :meth:`check`).
    conversation: Any = None
    prompt: Any = None

    def check(self) -> None:
        """Refuse what would be silently wrong if ignored."""
        if self.conversation is not None:
            raise RequestError(
                "conversation objects are not supported here; continue a conversation with "
                "previous_response_id, or send its items as input",
                "conversation",
            )
        if self.prompt is not None:
            raise RequestError(
                "stored prompt templates (prompt) are not supported here; send instructions "
                "and input",
                "prompt",
            )

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Function tools in the chat shape (``{"type": "function", "function": {...}}``)."""
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            at = f"tools[{i}]"
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, Mapping) else None
                raise RequestError(
                    f"{at}: only function tools are supported here, not {kind!r} "
                    "(hosted tools such as web_search need OpenAI's servers)",
                    f"{at}.type",
                )
            # The chat shape the same SDKs send to /v1/chat/completions, in their key order,
            # so that a prompt (and what it restores) is the same whichever API sent it.
            keys = ("name", "description", "parameters", "strict")
            out.append({"type": "function", "function": {k: tool[k] for k in keys if k in tool}})
        return out

    def chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, Mapping):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise RequestError(
                    'tool_choice must be none, auto, required or {"type": "function", "name": '
                    "...} (allowed_tools and hosted tools are not supported)",
                    "tool_choice",
                )
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, Mapping):
            raise RequestError("text.format must be an object with a type", "text.format")
        kind = fmt.get("type")
        if kind == "json_schema":
            spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
            return {"type": "json_schema", "json_schema": spec}
        if kind not in ("text", "json_object"):
            raise RequestError(
                f"text.format.type must be text, json_object or json_schema, not {kind!r}",
                "text.format.type",
            )
        return dict(fmt)

    def llama_kwargs(self) -> dict[str, Any]:
        """The chat call's keyword arguments (those the client set)."""
        out: dict[str, Any] = {
            "tool_choice": self.chat_tool_choice(),
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self.response_format(),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        return {k: v for k, v in out.items() if v is not None}


def input_messages(value: str | list[Any]) -> list[dict[str, Any]]:
    """Responses ``input`` as chat messages: a string is one user message; items are messages
    (text parts joined), ``function_call`` (joined into the assistant message before it, as a
    chat client sends a reply with calls) and ``function_call_output`` (a tool message).
    ``reasoning`` items are dropped: this server never makes them."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        at = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise RequestError(f"{at} must be an object (a message or a function call item)", at)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(
                    f"{at}.role must be user, system, developer or assistant, not {role!r}",
                    f"{at}.role",
                )
            out.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", at),
                "type": "function",
                "function": {"name": _string(item, "name", at), "arguments": _arguments(item, at)},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"{at}.output")
            out.append(
                {"role": "tool", "tool_call_id": _string(item, "call_id", at), "content": content}
            )
        elif kind == "reasoning":
            continue
        else:
            raise RequestError(
                f"{at}.type: input items of type {kind!r} are not supported; expected message, "
                "function_call or function_call_output",
                f"{at}.type",
            )
    return out


def _text(content: Any, at: str) -> str:
    """Message content as text: a string, or text parts joined (as the chat endpoint joins)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{at} must be a string or a list of text parts", at)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in _TEXT_PARTS:
            raise RequestError(
                f"{at}[{j}]: content of type {kind!r} is not supported (text only: input_text, "
                "output_text)",
                f"{at}[{j}].type",
            )
        key = "refusal" if kind == "refusal" else "text"
        text = part.get(key)
        if not isinstance(text, str):
            raise RequestError(f"{at}[{j}].{key} must be a string", f"{at}[{j}].{key}")
        texts.append(text)
    return "".join(texts)


def _string(item: Mapping[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{at}.{key} is required (a string)", f"{at}.{key}")
    return value


def _arguments(item: Mapping[str, Any], at: str) -> str:
    value = item.get("arguments", "{}")
    if isinstance(value, Mapping):
        return json.dumps(value)
    if not isinstance(value, str):
        raise RequestError(f"{at}.arguments must be a JSON string", f"{at}.arguments")
    return value


def chat_call(body: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCall:
    """The chat request a Responses request runs as: instructions, the stored conversation of
    ``previous_response_id`` (``history``), then the new input; checked as a chat request."""
    body.check()
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = [*system, *history, *input_messages(body.input)]
    kwargs = body.llama_kwargs()
    return normalise_chat(messages, body.chat_tools(), **kwargs)


def add_routes(app: FastAPI, server: Server) -> None:
    """``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}`` on ``app``."""
    memory = ResponseMemory()

    @app.post("/v1/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        ns = server.namespace(request)
        worker = server.worker(body.model)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = memory.get(ns, body.previous_response_id)
            if previous is None:
                raise APIError(
                    400,
                    f"previous response {body.previous_response_id!r} not found: this server "
                    f"keeps the last {memory.per_tenant} responses made with store: true for "
                    f"{memory.seconds / 60:.0f} minutes, in memory (lost on restart)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = previous.conversation
        try:
            call = chat_call(body, history)
        except RequestError as exc:
            raise api_error(exc) from exc
        kwargs = {**body.llama_kwargs(), "stream_options": {"include_usage": True}}
        made: list[Any] = []

        def start(**kw: Any) -> Any:
            made.append(
                worker.cache.chat(call.messages, tools=call.tools, namespace=ns, stream=True, **kw)
            )
            return made[-1]

        builder = ResponseBuilder(_skeleton(body))
        run = capped(start, kwargs, server.config.max_tokens_cap)
        try:
            if body.stream:
                chunks = await stream_call(worker, run, disconnected=request.is_disconnected)
            else:
                result = await collect_call(worker, run, disconnected=request.is_disconnected)
        except ClientGone:
            log.info("client went away before its response: generation stopped")
            return Response(status_code=499)
        except Exception as exc:
            raise api_error(exc) from exc
        server.api_cache.record_call(API, worker.id, made)

        def keep() -> None:
            if body.store:
                # The conversation goes on without these instructions (as OpenAI's does).
                said = call.messages[1:] if body.instructions else call.messages
                memory.put(ns, StoredResponse(builder.response(), [*said, builder.reply()]))

        if not body.stream:
            for chunk in as_chunks(result):
                builder.feed(chunk)
            builder.finish()
            keep()
            return JSONResponse(builder.response())

        async def events() -> AsyncIterator[str]:
            for event in builder.start():
                yield _sse(event)
            try:
                async for chunk in chunks:
                    for event in builder.feed(chunk):
                        yield _sse(event)
                for event in builder.finish():
                    yield _sse(event)
            except Exception as exc:  # after the headers: report in-band, as OpenAI does
                error = api_error(exc)
                yield _sse(builder.error(error.message, error.code, error.param))
                return
            keep()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> dict[str, Any]:
        stored = memory.get(server.namespace(request), response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
        if not memory.delete(server.namespace(request), response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


def _not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"no response {response_id!r}: responses are kept only with store: true, in this "
        "server's memory, for a while (see docs/server.md)",
        code="not_found",
    )


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _skeleton(body: ResponsesRequest) -> dict[str, Any]:
    """The response object before its output: what was asked, as OpenAI echoes it."""
    return {
        "id": "resp_" + uuid.uuid4().hex,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store,
        "temperature": body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": body.metadata or {},
    }


__all__ = ["API", "ResponsesRequest", "add_routes", "chat_call", "input_messages"]
