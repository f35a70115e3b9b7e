"""Scanning a reply that is still being generated for JSON tool calls (no model, no I/O).

Every parser in :mod:`prefixcache.tools.parsers` reads the reply text generated so far and says
which part of it is plain content and which part is tool calls, some of them still incomplete.
The helpers here do the JSON part: where an object ends (or that it has not ended yet), whether
``{"name": "...", "arguments": `` has been seen (so that the arguments can be streamed as they are
generated), and whether a complete object is a call at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

WHITESPACE = " \t\r\n"


@dataclass
class PartialCall:
    """A tool call seen in the reply; ``arguments`` grows while ``done`` is false."""

    name: str
    arguments: str
    done: bool


@dataclass
class Scan:
    """What a parser made of the reply so far: content safe to show, and the calls seen."""

    content: str = ""
    calls: list[PartialCall] = field(default_factory=list)


def skip(text: str, pos: int, chars: str = WHITESPACE) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def json_end(text: str, start: int) -> int | None:
    """The index just after the JSON object or array opening at ``start``; None if unclosed.

    Only brackets and strings are followed (values are checked later by ``json.loads``), so this
    also finds the end of malformed JSON, which is then rejected as a call.
    """
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def held_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class Opener(Enum):
    MATCH = "match"  # ``{"name": "...", "<args key>": {`` seen: arguments may be streamed
    PARTIAL = "partial"  # the text so far could still become one
    NO = "no"  # it cannot (the object may still be a call in another shape: see as_call)


class _Incomplete(Exception):
    pass


class _Mismatch(Exception):
    pass


def _string(text: str, pos: int) -> tuple[str, int]:
    if pos >= len(text):
        raise _Incomplete
    if text[pos] != '"':
        raise _Mismatch
    end = pos + 1
    while end < len(text):
        if text[end] == "\\":
            end += 2
            continue
        if text[end] == '"':
            try:
                return json.loads(text[pos : end + 1]), end + 1
            except ValueError as exc:
                raise _Mismatch from exc
        end += 1
    raise _Incomplete


def _literal(text: str, pos: int, lit: str) -> int:
    pos = skip(text, pos)
    got = text[pos : pos + len(lit)]
    if got == lit:
        return pos + len(lit)
    if lit.startswith(got) and pos + len(got) == len(text):
        raise _Incomplete
    raise _Mismatch


def match_opener(text: str, start: int, arg_keys: tuple[str, ...]) -> tuple[Opener, str, int]:
    """Match ``{ ["type": "function",] "name": "<name>", "<arg key>": {`` at ``start``.

    Returns ``(Opener.MATCH, name, index of the arguments' "{")`` or PARTIAL/NO with ``("", -1)``.
    """
    try:
        pos = _literal(text, start, "{")
        key, pos = _string(text, skip(text, pos))
        if key == "type":
            pos = _literal(text, pos, ":")
            value, pos = _string(text, skip(text, pos))
            if value != "function":
                raise _Mismatch
            pos = _literal(text, pos, ",")
            key, pos = _string(text, skip(text, pos))
        if key != "name":
            raise _Mismatch
        pos = _literal(text, pos, ":")
        name, pos = _string(text, skip(text, pos))
        pos = _literal(text, pos, ",")
        key, pos = _string(text, skip(text, pos))
        if key not in arg_keys:
            raise _Mismatch
        pos = _literal(text, pos, ":")
        pos = skip(text, pos)
        if pos >= len(text):
            raise _Incomplete
        if text[pos] != "{" or not name:
            raise _Mismatch
        return Opener.MATCH, name, pos
    except _Incomplete:
        return Opener.PARTIAL, "", -1
    except _Mismatch:
        return Opener.NO, "", -1


def as_call(value: Any, arg_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """``(name, arguments as a JSON string)`` when a parsed JSON value is a call, else None.

    Accepts the arguments as an object or as a JSON string holding one (some models stringify
    them, as OpenAI's own wire format does).
    """
    if not isinstance(value, dict):
        return None
    if value.get("type", "function") != "function" and "function" not in value:
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None
    for key in arg_keys:
        if key not in value:
            continue
        args = value[key]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if isinstance(args, dict):
            return name, json.dumps(args, ensure_ascii=False)
        return None
    return None


class ObjectScan(Enum):
    CALL = "call"  # a whole call: ``end`` is after its object
    OPEN = "open"  # a call whose arguments (or closing brace) are still being generated
    HOLD = "hold"  # cannot tell yet whether this is a call
    TEXT = "text"  # not a call


def scan_object(
    text: str, start: int, final: bool, arg_keys: tuple[str, ...]
) -> tuple[ObjectScan, PartialCall | None, int]:
    """Read the JSON object at ``start`` (``text[start] == "{"``) as a call if it is one.

    Returns the verdict, the call (for CALL and OPEN) and, for CALL, the index after the object.
    A call in the usual key order is recognised as soon as its name is known, so its arguments
    stream; any other shape is decided once the object is complete.
    """
    opener, name, args_at = match_opener(text, start, arg_keys)
    end = json_end(text, start)
    if opener is Opener.MATCH:
        args_end = json_end(text, args_at)
        if args_end is None:
            return ObjectScan.OPEN, PartialCall(name, text[args_at:], False), -1
        call = PartialCall(name, text[args_at:args_end], end is not None)
        if end is None:
            return ObjectScan.OPEN, call, -1
        return ObjectScan.CALL, call, end
    if end is None:
        return (ObjectScan.TEXT if final else ObjectScan.HOLD), None, -1
    try:
        found = as_call(json.loads(text[start:end]), arg_keys)
    except ValueError:
        found = None
    if found is None:
        return ObjectScan.TEXT, None, -1
    return ObjectScan.CALL, PartialCall(found[0], found[1], True), end


__all__ = [
    "ObjectScan",
    "Opener",
    "PartialCall",
    "Scan",
    "as_call",
    "held_suffix",
    "json_end",
    "match_opener",
    "scan_object",
    "skip",
]
