"""One OpenAI response put together from the chunks of a streaming call.

The server runs every request as a stream, so that a client that goes away stops its generation
at the next token; a request that did not ask to stream gets the chunks assembled here into the
response ``stream=False`` would have given. Deltas are merged as the official ``openai`` client
merges them (strings concatenated, list items merged by their ``index``), so ``tool_calls``
streamed as ``delta.tool_calls`` with arguments in pieces come out whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Chunk = dict[str, Any]


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Merge one streamed ``delta`` into ``acc`` (changed in place and returned).

    Strings are concatenated, except ``index`` and ``type``, which are replaced; dicts are merged
    key by key; lists of dicts are merged item by item on each item's ``index`` (new indexes are
    appended); other lists are extended.
    """
    for key, value in delta.items():
        old = acc.get(key)
        if old is None or key in ("index", "type"):
            acc[key] = _fresh(value)
        elif isinstance(old, str) and isinstance(value, str):
            acc[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            merge_delta(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            _merge_items(old, value)
        elif value is not None:
            acc[key] = _fresh(value)
    return acc


def _merge_items(old: list[Any], new: list[Any]) -> None:
    for item in new:
        if not (isinstance(item, dict) and isinstance(item.get("index"), int)):
            old.append(_fresh(item))
            continue
        same = next(
            (o for o in old if isinstance(o, dict) and o.get("index") == item["index"]), None
        )
        if same is None:
            old.append(_fresh(item))
        else:
            merge_delta(same, item)


def _fresh(value: Any) -> Any:
    """A copy of a delta's value deep enough that later merges never change the chunk."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


class Assembler:
    """Collects the chunks of one call (chat or text completion) into its final response."""

    def __init__(self) -> None:
        self.head: Chunk | None = None  #: the first chunk: id, created, model
        self.usage: dict[str, Any] | None = None
        self.chat = False
        self._message: dict[str, Any] = {}
        self._text: list[str] = []
        self._logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def add(self, chunk: Chunk) -> None:
        if self.head is None:
            self.head = chunk
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if "delta" in choice:
                self.chat = True
                merge_delta(self._message, choice.get("delta") or {})
            elif choice.get("text"):
                self._text.append(choice["text"])
            if choice.get("logprobs"):
                self._logprobs = merge_delta(self._logprobs or {}, choice["logprobs"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def extend(self, chunks: Iterable[Chunk]) -> Assembler:
        for chunk in chunks:
            self.add(chunk)
        return self

    def result(self) -> dict[str, Any]:
        """The response: ``chat.completion`` or ``text_completion``, with ``usage``."""
        head = self.head or {}
        if self.chat:
            choice = {"index": 0, "message": self.message(), "logprobs": self._logprobs}
            kind = "chat.completion"
        else:
            choice = {"text": "".join(self._text), "index": 0, "logprobs": self._logprobs}
            kind = "text_completion"
        choice["finish_reason"] = self.finish_reason
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return {
            "id": head.get("id", ""),
            "object": kind,
            "created": head.get("created", 0),
            "model": head.get("model", ""),
            "choices": [choice],
            "usage": usage,
        }

    def message(self) -> dict[str, Any]:
        """The assistant message: role, content (None when it only calls tools), tool_calls."""
        merged = self._message
        message: dict[str, Any] = {"role": merged.get("role") or "assistant"}
        calls = [
            {k: v for k, v in call.items() if k != "index"}
            for call in sorted(merged.get("tool_calls") or [], key=lambda c: c.get("index", 0))
        ]
        message["content"] = merged.get("content") or (None if calls else "")
        if calls:
            message["tool_calls"] = calls
        for key, value in merged.items():  # anything else a delta carried (refusal, ...)
            if key not in ("role", "content", "tool_calls"):
                message[key] = value
        return message


__all__ = ["Assembler", "merge_delta"]
