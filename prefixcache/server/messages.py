"""Anthropic's Messages API: ``POST /v1/messages`` (SSE or not) and ``/v1/messages/count_tokens``.

A request is checked and mapped onto an OpenAI-shaped chat (:mod:`.anthropic_schema`) and runs
through :meth:`PrefixCache.chat` on the model's worker, as ``/v1/chat/completions`` does: the same
template, tool-call parsing and constrained decoding (``tool_choice`` any/tool are a grammar).
Before it, on the same thread, its ``cache_control`` breakpoints are pinned with their TTLs
(:mod:`.breakpoints`). The reply is turned into Anthropic's message, or its event stream
(``message_start``, ``content_block_*``, ``message_delta``, ``message_stop``, ``ping``), by
:mod:`.anthropic_reply`. Errors
are in Anthropic's shape and status codes. docs/anthropic.md has the accounting of ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llama_cpp import LogitsProcessorList

from ..errors import ConfigError, PromptTooLongError
from ..request import normalise_chat
from .anthropic_reply import Blocks, StopAtSequences, from_completion, message, usage
from .anthropic_schema import MessagesRequest, parse_messages_request
from .auth import namespace_for
from .breakpoints import Written, pin_breakpoints
from .core import Server
from .schema import APIError, Overloaded, api_error
from .worker import ClientGone, ModelWorker, capped, collect_call, stream_call

log = logging.getLogger(__name__)

API = "/v1/messages"
#: Scales every cache_control TTL (5m, 1h) by this factor; for tests, or to keep entries longer.
TTL_SCALE_ENV = "PREFIXCACHE_CACHE_TTL_SCALE"
#: Bodies larger than this are refused with 413, as Anthropic's Messages API does.
MAX_BODY_BYTES = 32 * 1024 * 1024

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# --- errors -----------------------------------------------------------------------------------


class AnthropicError(APIError):
    """An error answered in Anthropic's shape: ``{"type": "error", "error": {type, message}}``."""

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.kind, "message": self.message}}


def anthropic_error(exc: BaseException) -> AnthropicError:
    """The Anthropic-shaped answer for an exception raised while serving a request.

    A full queue is Anthropic's 529 ``overloaded_error`` (with Retry-After).
    """
    if isinstance(exc, AnthropicError):
        return exc
    err = api_error(exc)
    status = 529 if isinstance(err, Overloaded) else err.status
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return AnthropicError(status, err.message, kind=kind, headers=err.headers)


def ttl_scale_from_env() -> float:
    """The TTL scale from ``$PREFIXCACHE_CACHE_TTL_SCALE`` (default 1)."""
    raw = os.environ.get(TTL_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        scale = -1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"${TTL_SCALE_ENV} must be a positive number, not {raw!r}")
    return scale


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


# --- routes -----------------------------------------------------------------------------------


def tenant(server: Server, request: Request) -> str:
    """The request's namespace from ``x-api-key`` (or ``Authorization: Bearer``); 401 without
    a valid key when the server has keys."""
    if not server.keys:
        return ""
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        key = bearer.strip() if scheme.lower() == "bearer" else ""
    if not key or not server.keys.valid(key):
        raise AnthropicError(
            401, "a valid API key is needed: x-api-key: <key>", kind="authentication_error"
        )
    return namespace_for(key)


async def _body(request: Request) -> Any:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise AnthropicError(
            413, f"the request is over {MAX_BODY_BYTES} bytes", kind="request_too_large"
        )
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise AnthropicError(
            413, f"the request is over {MAX_BODY_BYTES} bytes", kind="request_too_large"
        )
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise AnthropicError(400, f"the body is not valid JSON: {exc}") from exc


@dataclass
class _Call:
    """One Messages call on a worker: what it runs, and what its breakpoints wrote."""

    server: Server
    worker: ModelWorker
    request: MessagesRequest
    namespace: str
    ttl_scale: float
    written: Written = field(default_factory=Written)
    made: list[Any] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        req = self.request
        out: dict[str, Any] = {"max_tokens": req.max_tokens, **req.sampling}
        out["stream_options"] = {"include_usage": True}
        if req.tool_choice is not None:
            out["tool_choice"] = req.tool_choice
        if req.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = req.parallel_tool_calls
        if req.response_format is not None:
            out["response_format"] = req.response_format
        return out

    def checked(self) -> None:
        """Check the mapped chat as the library will (a 400 before it queues)."""
        messages, tools = self.request.chat()
        normalise_chat(messages, tools, **self.kwargs())

    def run(self, **kwargs: Any) -> Any:
        """Pin the breakpoints, then start the chat (on the model's thread)."""
        cache = self.worker.cache
        req = self.request
        messages, tools = req.chat()
        full = cache.template.tokens(messages, tools)
        extra = int(kwargs.get("max_tokens") or 1)
        if len(full) + extra > cache.kv.n_ctx:
            raise PromptTooLongError(len(full) + extra, cache.kv.n_ctx, "prompt plus max_tokens")
        # Also for a request without breakpoints: the breakpoint pins it reads are refreshed.
        self.written = pin_breakpoints(cache, req, full, self.namespace, ttl_scale=self.ttl_scale)
        forced = req.tool_choice not in (None, "auto", "none") or req.response_format
        if req.stop_sequences and not forced:
            stop = StopAtSequences(cache.llm, req.stop_sequences)
            kwargs["logits_processor"] = LogitsProcessorList([stop])
        self.made.append(
            cache.chat(messages, tools=tools, namespace=self.namespace, stream=True, **kwargs)
        )
        return self.made[-1]

    def record(self, use: dict[str, Any]) -> None:
        self.server.api_cache.record(
            API,
            self.worker.id,
            read_tokens=use["cache_read_input_tokens"],
            write_tokens=use["cache_creation_input_tokens"],
        )


def add_routes(app: FastAPI, server: Server) -> None:
    """Serve Anthropic's Messages API on ``app`` (see the module docstring)."""
    ttl_scale = ttl_scale_from_env()

    @app.post(API, response_model=None)
    async def messages(request: Request) -> Response:
        try:
            ns = tenant(server, request)
            req = parse_messages_request(await _body(request))
            worker = server.worker(req.model)
            call = _Call(server, worker, req, ns, ttl_scale)
            call.checked()
            start = capped(call.run, call.kwargs(), server.config.max_tokens_cap)
            gone = request.is_disconnected
            if not req.stream:
                result = await collect_call(worker, start, disconnected=gone)
            else:
                chunks = await stream_call(worker, start, disconnected=gone)
        except ClientGone:
            log.info("client went away before its reply: generation stopped")
            return Response(status_code=499)
        except Exception as exc:
            raise anthropic_error(exc) from exc
        msg_id = "msg_" + uuid.uuid4().hex[:24]
        stops = req.stop_sequences
        if not req.stream:
            blocks = from_completion(result, stops)
            use = result.get("usage") or {}
            cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            answer = usage(use.get("prompt_tokens", 0), cached, call.written, blocks.output_tokens)
            call.record(answer)
            return JSONResponse(message(msg_id, req.model, blocks, answer))
        prepared = getattr(call.made[-1], "prepared", None) if call.made else None
        prompt = prepared.prompt_tokens if prepared is not None else 0
        reused = prepared.reused_tokens if prepared is not None else 0
        return StreamingResponse(
            _events(call, chunks, msg_id, prompt, reused),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post(API + "/count_tokens", response_model=None)
    async def count_tokens(request: Request) -> Response:
        try:
            tenant(server, request)
            req = parse_messages_request(await _body(request), count_only=True)
            worker = server.worker(req.model)
            messages, tools = req.chat()
            normalise_chat(messages, tools, tool_choice=req.tool_choice)
            # Tokenizing reads the vocabulary only: no need to queue behind generation.
            tokens = await asyncio.to_thread(worker.cache.template.tokens, messages, tools)
        except Exception as exc:
            raise anthropic_error(exc) from exc
        return JSONResponse({"input_tokens": len(tokens)})


async def _events(
    call: _Call, chunks: AsyncIterator[dict[str, Any]], msg_id: str, prompt: int, reused: int
) -> AsyncIterator[str]:
    """Anthropic's event stream for one call's chunks."""
    req = call.request
    blocks = Blocks(req.stop_sequences)
    use = usage(prompt, reused, call.written, 0)
    head: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": use,
    }
    yield _sse({"type": "message_start", "message": head})
    pinged = False  # one ping after the first block starts, where Anthropic's streams have it
    try:
        async for chunk in chunks:
            for event in blocks.chunk(chunk):
                yield _sse(event)
                if not pinged and event["type"] == "content_block_start":
                    pinged = True
                    yield _sse({"type": "ping"})
    except Exception as exc:  # after the headers: report in-band, as Anthropic does
        yield _sse(anthropic_error(exc).body())
        return
    finally:  # a client that went away stops the generation now, not when this is collected
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    for event in blocks.end():
        yield _sse(event)
    if not pinged:
        yield _sse({"type": "ping"})
    use = {**use, "output_tokens": blocks.output_tokens}
    call.record(use)
    delta = {"stop_reason": blocks.stop_reason, "stop_sequence": blocks.scanner.matched}
    yield _sse({"type": "message_delta", "delta": delta, "usage": use})
    yield _sse({"type": "message_stop"})


__all__ = [
    "API",
    "MAX_BODY_BYTES",
    "TTL_SCALE_ENV",
    "AnthropicError",
    "add_routes",
    "anthropic_error",
    "tenant",
    "usage",
]
