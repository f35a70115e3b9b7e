"""A generated reply as Anthropic content: text and ``tool_use`` blocks, events, ``usage``.

The chat path gives OpenAI-shaped chunks (content deltas, ``tool_calls`` deltas, a usage chunk);
:class:`Blocks` turns them into Anthropic's content blocks and the ``content_block_*`` events that
stream them, and a whole completion goes through the same steps (:func:`from_completion`), so a
streamed reply adds up to the non-streamed one. Stop sequences are cut here
(:class:`StopScanner`), with generation ended by :class:`StopAtSequences`, so that
``stop_sequence`` is told apart from a natural end. :func:`usage` is the accounting of
docs/anthropic.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llama_cpp import Llama

from ..request import arguments_object
from .breakpoints import Written

log = logging.getLogger(__name__)


# --- stop sequences ---------------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back what may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.matched: str | None = None
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held) that is certainly before any stop."""
        if self.matched is not None:
            return ""
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, self.matched = min(hits)
            self._held = ""
            return buf[:at]
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0
        )
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """What was held back (the reply went on with something else, or ended)."""
        out, self._held = ("" if self.matched is not None else self._held), ""
        return out


class StopAtSequences:
    """A logits processor that ends generation (forces end-of-sequence) once the text generated
    so far holds a stop sequence: the reply is cut there by :class:`StopScanner`, which also
    tells ``stop_sequence`` from a natural end, as llama-cpp-python's own ``stop`` cannot."""

    def __init__(self, llm: Llama, stops: list[str]):
        self.llm = llm
        self.stops = [s.encode("utf-8") for s in stops]
        self.eos = llm.token_eos()
        self.start: int | None = None
        self.seen = 0
        self.text = b""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = len(input_ids)
        if self.start is None:
            self.start = self.seen = n
        if n > self.seen:
            new = [int(t) for t in input_ids[self.seen : n]]
            prev = [int(t) for t in input_ids[self.start : self.seen]]
            self.text += self.llm.detokenize(new, prev_tokens=prev)
            self.seen = n
        if any(s in self.text for s in self.stops):
            scores[:] = -np.inf
            scores[self.eos] = 0.0
        return scores


# --- usage ------------------------------------------------------------------------------------


def usage(prompt_tokens: int, reused: int, written: Written, output_tokens: int) -> dict[str, Any]:
    """Anthropic's usage from what the call did (see docs/anthropic.md, "Accounting").

    ``reused``: prompt tokens the generation did not prefill; ``written``: tokens the
    breakpoints prefilled and stored just before it (so among those reused).
    """
    creation = min(written.tokens, prompt_tokens)
    read = max(0, min(reused, prompt_tokens) - creation)
    return {
        "input_tokens": prompt_tokens - read - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": written.by_ttl.get("5m", 0),
            "ephemeral_1h_input_tokens": written.by_ttl.get("1h", 0),
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _stop_reason(finish: str | None, stop: str | None) -> str:
    if stop is not None:
        return "stop_sequence"
    return {"tool_calls": "tool_use", "length": "max_tokens"}.get(finish or "", "end_turn")


def _tool_input(arguments: str) -> dict[str, Any]:
    value = arguments_object(arguments or "{}")
    if not isinstance(value, dict):
        log.warning("a tool call's arguments are not a JSON object: %.80r", arguments)
        return {}
    return value


# --- the reply as Anthropic content ---------------------------------------------------------


@dataclass
class Blocks:
    """An OpenAI chat completion's deltas turned into Anthropic content blocks, and the events
    that stream them."""

    stops: list[str]
    content: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None
    output_tokens: int = 0

    def __post_init__(self) -> None:
        self.scanner = StopScanner(self.stops)
        self._open: int | None = None
        self._calls: dict[int, int] = {}  # OpenAI tool_calls index → block index
        self._args: dict[int, str] = {}

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one streamed chunk."""
        if chunk.get("usage"):
            self.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self.text(self.scanner.feed(delta["content"]))
            for call in delta.get("tool_calls") or []:
                events += self.call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return events

    def text(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events = []
        at = self._open
        if at is None or self.content[at]["type"] != "text":
            events += self.close()
            at = self._start({"type": "text", "text": ""}, events)
        self.content[at]["text"] += text
        delta = {"type": "text_delta", "text": text}
        return [*events, {"type": "content_block_delta", "index": at, "delta": delta}]

    def call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        if self.scanner.matched is not None:
            return []  # the reply ended at a stop sequence
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        events = []
        if index not in self._calls:
            events += self.text(self.scanner.flush())
            events += self.close()
            block = {"type": "tool_use", "id": call.get("id"), "name": function.get("name")}
            self._calls[index] = self._start({**block, "input": {}}, events)
            self._args[self._calls[index]] = ""
        at = self._calls[index]
        piece = function.get("arguments") or ""
        if piece:
            self._args[at] += piece
            delta = {"type": "input_json_delta", "partial_json": piece}
            events.append({"type": "content_block_delta", "index": at, "delta": delta})
        return events

    def _start(self, block: dict[str, Any], events: list[dict[str, Any]]) -> int:
        """Open a new block (its start event added to ``events``); its index."""
        self.content.append(dict(block))
        self._open = len(self.content) - 1
        events.append({"type": "content_block_start", "index": self._open, "content_block": block})
        return self._open

    def close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        at, self._open = self._open, None
        return [{"type": "content_block_stop", "index": at}]

    def end(self) -> list[dict[str, Any]]:
        """The events that finish the content (the held-back text, the open block)."""
        return [*self.text(self.scanner.flush()), *self.close()]

    @property
    def stop_reason(self) -> str:
        return _stop_reason(self.finish, self.scanner.matched)

    def blocks(self) -> list[dict[str, Any]]:
        """The finished content, tool inputs parsed."""
        out = []
        for i, block in enumerate(self.content):
            if block["type"] == "tool_use":
                block = {**block, "input": _tool_input(self._args.get(i, ""))}
            out.append(block)
        return out


def message(msg_id: str, model: str, blocks: Blocks, use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks.blocks(),
        "stop_reason": blocks.stop_reason,
        "stop_sequence": blocks.scanner.matched,
        "usage": use,
    }


def from_completion(result: dict[str, Any], stops: list[str]) -> Blocks:
    """A non-streamed chat completion's reply as blocks (the same steps as streaming)."""
    choice = result["choices"][0]
    msg = choice.get("message") or {}
    blocks = Blocks(stops)
    calls = [{**c, "index": i} for i, c in enumerate(msg.get("tool_calls") or [])]
    blocks.chunk({"choices": [{"delta": {"content": msg.get("content"), "tool_calls": calls}}]})
    blocks.end()
    blocks.finish = choice.get("finish_reason")
    blocks.output_tokens = int((result.get("usage") or {}).get("completion_tokens") or 0)
    return blocks


__all__ = [
    "Blocks",
    "StopAtSequences",
    "StopScanner",
    "from_completion",
    "message",
    "usage",
]
