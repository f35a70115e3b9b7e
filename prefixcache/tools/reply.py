"""Turning a generated reply into OpenAI's ``content`` + ``tool_calls``, streamed or whole.

:class:`ReplyParser` is fed the reply as it is generated and gives OpenAI delta dicts: content as
soon as it cannot be part of a call, a call's ``id`` and ``name`` as soon as the name is known, its
arguments as they are generated. A whole reply goes through the same steps (feed everything, then
finish), so a streamed reply always adds up to the non-streamed one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .parsers import ToolParser

Delta = dict[str, Any]


class ReplyParser:
    """The content and tool calls of one reply, from its text fed piece by piece."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.content = ""
        #: ``[id, name, arguments]`` of the calls seen so far (arguments as sent).
        self._calls: list[list[str]] = []
        self._done: list[bool] = []

    def feed(self, text: str) -> list[Delta]:
        """Deltas for what ``text`` (the next piece of the reply) makes certain."""
        self.text += text
        return self._step(final=False)

    def finish(self) -> list[Delta]:
        """Deltas for the rest, now that the reply is complete."""
        return self._step(final=True)

    def _step(self, final: bool) -> list[Delta]:
        scan = self.parser.scan(self.text, final)
        # Trailing whitespace is held: it is dropped if a call follows (or ends the reply).
        content = scan.content if final and not scan.calls else scan.content.rstrip()
        out: list[Delta] = []
        if len(content) > len(self.content) and content.startswith(self.content):
            out.append({"content": content[len(self.content) :]})
            self.content = content
        for i, call in enumerate(scan.calls):
            if i == len(self._calls):
                call_id = self.parser.new_id()
                self._calls.append([call_id, call.name, ""])
                self._done.append(False)
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            sent = self._calls[i][2]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                piece = call.arguments[len(sent) :]
                self._calls[i][2] = call.arguments
                out.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
            self._done[i] = call.done
        return out

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's ``message.tool_calls`` shape."""
        return [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in self._calls
        ]

    def message(self) -> dict[str, Any]:
        """The finished reply as an OpenAI assistant message."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self._calls:
            msg["content"] = self.content or None
            msg["tool_calls"] = self.tool_calls
        return msg


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` when the model stopped after making calls."""
    return "tool_calls" if has_calls and reason == "stop" else reason


def parse_completion(result: dict[str, Any], parser: ToolParser) -> dict[str, Any]:
    """A non-streamed chat completion with the tool calls in its text moved to ``tool_calls``."""
    choice = result["choices"][0]
    text = choice["message"].get("content") or ""
    reply = ReplyParser(parser)
    reply.feed(text)
    reply.finish()
    message = reply.message()
    choice["message"] = {**choice["message"], **message}
    choice["finish_reason"] = finish_reason(choice.get("finish_reason"), bool(reply.tool_calls))
    return result


class ChunkParser:
    """Rewrites the chunks of a streamed chat completion so that tool calls come as
    ``delta.tool_calls`` (see the module docstring)."""

    def __init__(self, parser: ToolParser):
        self.reply = ReplyParser(parser)

    def rewrite(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        choices = chunk.get("choices") or []
        if not choices:
            yield chunk
            return
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content")
        reason = choice.get("finish_reason")
        if text is None and reason is None:
            yield chunk  # the role chunk
            return
        deltas = self.reply.feed(text) if text else []
        if reason is not None:
            deltas += self.reply.finish()
        for i, d in enumerate(deltas):
            yield self._chunk(chunk, d, choice.get("logprobs") if i == 0 else None)
        if reason is not None:
            yield self._chunk(chunk, {}, None, finish_reason(reason, bool(self.reply.tool_calls)))

    @staticmethod
    def _chunk(
        like: dict[str, Any], delta: Delta, logprobs: Any, reason: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": like.get("id", ""),
            "object": like.get("object", "chat.completion.chunk"),
            "created": like.get("created", int(time.time())),
            "model": like.get("model", ""),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            ],
        }


__all__ = ["ChunkParser", "ReplyParser", "finish_reason", "parse_completion"]
