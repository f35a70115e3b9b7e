"""Responses API output: chat chunks turned into output items and typed events, and the memory
of recent responses that ``previous_response_id`` reads.

:class:`ResponseBuilder` is fed the chunks of a streaming chat completion (content deltas, then
``delta.tool_calls`` as :mod:`prefixcache.tools.reply` streams them) and gives the events OpenAI's
Responses API streams: ``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta`` and their ``.done``
events, ``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut it). A
response that is not streamed is built by the same steps (:func:`as_chunks`), so the two agree.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]

#: Responses kept per tenant for ``previous_response_id`` (the oldest go first beyond it).
DEFAULT_KEEP_RESPONSES = 256
#: Seconds a stored response is kept.
DEFAULT_KEEP_SECONDS = 3600.0


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponseBuilder:
    """One response's output items and events, from the chat chunks of its call."""

    def __init__(self, skeleton: dict[str, Any]):
        self._response = skeleton
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being generated
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_calls index → its item
        self._seq = 0
        self._reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **copy.deepcopy(fields)}
        self._seq += 1
        return event

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``."""
        snapshot = {**self._response, "output": []}
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events for one chat chunk."""
        out: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            if choice.get("finish_reason"):
                self._reason = choice["finish_reason"]
        return out

    def _add(self, item: dict[str, Any]) -> list[Event]:
        out = self._close()
        self._open = item
        self.items.append(item)
        return [
            *out,
            self._event("response.output_item.added", output_index=self._index, item=item),
        ]

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _text(self, text: str) -> list[Event]:
        out: list[Event] = []
        item = self._open
        if item is None or item["type"] != "message":
            item = {
                "id": _id("msg_"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            out += self._add(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            out.append(self._part_event("response.content_part.added", item, part=part))
        item["content"][0]["text"] += text
        if text:
            out.append(
                self._part_event("response.output_text.delta", item, delta=text, logprobs=[])
            )
        return out

    def _part_event(self, kind: str, item: dict[str, Any], **fields: Any) -> Event:
        index = self.items.index(item)
        return self._event(kind, item_id=item["id"], output_index=index, content_index=0, **fields)

    def _call(self, call: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        function = call.get("function") or {}
        item = self._calls.get(call.get("index", 0))
        if item is None:
            item = {
                "id": _id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.get("id") or _id("call_"),
                "name": function.get("name", ""),
                "arguments": "",
            }
            self._calls[call.get("index", 0)] = item
            out += self._add(item)
        piece = function.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.items.index(item),
                    delta=piece,
                )
            )
        return out

    def _close(self) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = "incomplete" if self._reason == "length" else "completed"
        index = self.items.index(item)
        if item["type"] == "message":
            part = item["content"][0]
            out = [
                self._part_event("response.output_text.done", item, text=part["text"], logprobs=[]),
                self._part_event("response.content_part.done", item, part=part),
            ]
        else:
            out = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            ]
        return [*out, self._event("response.output_item.done", output_index=index, item=item)]

    def finish(self) -> list[Event]:
        """The events that end the response: the last item's ``.done`` events, then
        ``response.completed`` (``response.incomplete`` when the call hit its token limit)."""
        out: list[Event] = []
        if not self.items:  # an empty reply is still a message
            out += self._text("")
        out += self._close()
        usage = self._usage or {}
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        incomplete = self._reason == "length"
        self._response.update(
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            output=self.items,
            usage={
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        )
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*out, self._event(kind, response=self._response)]

    def error(self, message: str, code: str | None, param: str | None) -> Event:
        """The in-band ``error`` event for a failure after the stream began."""
        self._response.update(
            status="failed", error={"code": code or "server_error", "message": message}
        )
        return self._event("error", code=code, message=message, param=param)

    def response(self) -> dict[str, Any]:
        """The response object (complete once :meth:`finish` ran)."""
        return self._response

    def reply(self) -> dict[str, Any]:
        """The reply as the chat assistant message the conversation continues from: the same
        message a client sending these output items back as input would give (see
        ``responses.input_messages``)."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [
            {
                "id": i["call_id"],
                "type": "function",
                "function": {"name": i["name"], "arguments": i["arguments"]},
            }
            for i in self.items
            if i["type"] == "function_call"
        ]
        if not calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": text or None, "tool_calls": calls}


def as_chunks(completion: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A (non-streamed) chat completion as the chunks that add up to it."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    yield {"choices": [{"delta": delta, "finish_reason": choice.get("finish_reason")}]}
    if completion.get("usage"):
        yield {"choices": [], "usage": completion["usage"]}


# --- the memory behind previous_response_id -----------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A response kept for ``previous_response_id``: the response object, and the conversation
    it ended as chat messages (its input without the instructions, then its reply)."""

    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    stored_at: float = field(default_factory=time.monotonic)


class ResponseMemory:
    """The tenants' recent responses, in this process's memory: at most ``per_tenant`` each
    (the oldest dropped first), each for ``seconds``; nothing survives a restart."""

    def __init__(
        self, per_tenant: int = DEFAULT_KEEP_RESPONSES, seconds: float = DEFAULT_KEEP_SECONDS
    ):
        self.per_tenant = per_tenant
        self.seconds = seconds
        self._lock = threading.Lock()
        self._tenants: dict[str, OrderedDict[str, StoredResponse]] = {}

    def put(self, namespace: str, stored: StoredResponse) -> None:
        with self._lock:
            kept = self._tenants.setdefault(namespace, OrderedDict())
            kept[stored.response["id"]] = stored
            self._expire(kept)
            while len(kept) > self.per_tenant:
                kept.popitem(last=False)

    def get(self, namespace: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            kept = self._tenants.get(namespace)
            if kept is None:
                return None
            self._expire(kept)
            return kept.get(response_id)

    def delete(self, namespace: str, response_id: str) -> bool:
        with self._lock:
            kept = self._tenants.get(namespace)
            return kept is not None and kept.pop(response_id, None) is not None

    def _expire(self, kept: OrderedDict[str, StoredResponse]) -> None:
        oldest = time.monotonic() - self.seconds
        while kept and next(iter(kept.values())).stored_at < oldest:
            kept.popitem(last=False)


__all__ = [
    "DEFAULT_KEEP_RESPONSES",
    "DEFAULT_KEEP_SECONDS",
    "ResponseBuilder",
    "ResponseMemory",
    "StoredResponse",
    "as_chunks",
]
