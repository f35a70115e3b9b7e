"""``cache_control`` breakpoints as pins: where each one ends in tokens, pinned with its TTL.

A breakpoint marks a block; the prefix "up to and including that block" is found at token level
the way pins find message boundaries (:meth:`~prefixcache.template.ChatTemplate.prefix_tokens`):
by rendering the conversation cut after the block with different continuations and keeping the
tokens they all share with the request. A block that ends its message (or the system prompt) ends
at that message's boundary; a block inside a message ends where the block's own text does. A
template that renders the marked block differently depending on what follows leaves no stable
boundary: the breakpoint is then skipped (logged), and the request runs uncached by it. A
breakpoint on a tool covers the tools up to it and whatever the template renders before them
(the system prompt, in most templates), so it holds while the system prompt stays the same.

Each breakpoint's prefix is pinned in the tenant's namespace under a name derived from its tokens
(``cache_control:<digest>``), with the breakpoint's TTL: a request that reads it refreshes it;
once it expires its segments are ordinary LRU entries, as a recipe pin's are.
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..cache import PrefixCache
from ..errors import QuotaExceededError, TemplateError
from ..radix import common_prefix_length
from ..template import ChatTemplate
from .anthropic_schema import TTLS, Breakpoint, MessagesRequest

log = logging.getLogger(__name__)

#: The prefix of the names of pins made for cache_control breakpoints (``prefixcache status``).
PIN_PREFIX = "cache_control:"
#: Source recorded on those pins.
PIN_SOURCE = "cache_control"

_PROBES = ("Zq9 probe", "7x probe")


@dataclass
class Written:
    """What one request's breakpoints wrote: prompt tokens prefilled and stored for them
    (Anthropic's ``cache_creation_input_tokens``), by TTL, and the pins made or refreshed."""

    tokens: int = 0
    by_ttl: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TTLS, 0))
    pins: list[str] = field(default_factory=list)
    #: Breakpoint pins of earlier requests that this one reads, their TTL restarted.
    refreshed: list[str] = field(default_factory=list)


def _probe_block(like: dict[str, Any], probe: str) -> dict[str, Any]:
    """A block of the same type as ``like`` (a continuation of its message)."""
    if like["type"] == "tool_use":
        return {"type": "tool_use", "id": "probe", "name": probe.replace(" ", "_"), "input": {}}
    if like["type"] == "tool_result":
        return {"type": "tool_result", "tool_use_id": "probe", "content": probe, "is_error": False}
    return {"type": "text", "text": probe}


def _cut(request: MessagesRequest, mark: Breakpoint, probe: str, variant: int) -> MessagesRequest:
    """The request cut after the marked block, continued by probe content."""
    user = {"role": "user", "content": [{"type": "text", "text": probe}]}
    if mark.kind == "tool":
        schema = {"type": "object", "properties": {}}
        extra = {"name": probe.replace(" ", "_"), "description": probe, "input_schema": schema}
        tools = [*request.tools[: mark.index + 1], extra]
        # The system prompt stays: templates render it before the tools (SmolLM2's fold them in
        # after it), and a prefix that may not hold it would end before the tools.
        return request.with_parts(tools=tools, messages=[user])
    if mark.kind == "system":
        return request.with_parts(
            system=[*request.system[: mark.index + 1], probe], messages=[user]
        )
    message = request.messages[mark.index]
    blocks = message["content"][: mark.block + 1]
    kept = {**message, "content": [*blocks, _probe_block(blocks[-1], probe)]}
    messages = [*request.messages[: mark.index], kept]
    if variant:
        role = "assistant" if message["role"] == "user" else "user"
        messages.append({"role": role, "content": [{"type": "text", "text": probe}]})
    return request.with_parts(messages=messages)


def _anchor(request: MessagesRequest, mark: Breakpoint) -> str:
    """Text the prefix must contain to cover the marked block (the end of its own text)."""
    if mark.kind == "tool":
        return str(request.tools[mark.index]["name"])
    if mark.kind == "system":
        text = request.system[mark.index]
    else:
        block = request.messages[mark.index]["content"][mark.block]
        text = {"text": "text", "tool_use": "name", "tool_result": "content"}[block["type"]]
        text = str(block[text])
    return text.strip()[-24:]


def boundary(
    template: ChatTemplate, request: MessagesRequest, mark: Breakpoint, full: Sequence[int]
) -> int | None:
    """How many of the request's tokens (``full``) the marked block's prefix is, or None when
    the template leaves no stable boundary after the block."""
    ends_message = (
        mark.kind == "message" and mark.block == len(request.messages[mark.index]["content"]) - 1
    )
    ends_system = mark.kind == "system" and mark.index == len(request.system) - 1
    try:
        if ends_message or ends_system:
            upto = mark.index + 1 if ends_message else 0
            messages, tools = request.with_parts(messages=request.messages[:upto]).chat()
            n = common_prefix_length(full, template.prefix_tokens(messages, tools))
        else:
            n = len(full)
            for variant, probe in enumerate(_PROBES):
                messages, tools = _cut(request, mark, probe, variant).chat()
                n = min(n, common_prefix_length(full, template.tokens(messages, tools)))
    except TemplateError as exc:
        log.info("cache_control at %s: no stable token boundary (%s); skipped", mark.where, exc)
        return None
    anchor = _anchor(request, mark)
    if n < 1 or (anchor and anchor not in template.detokenize(full[:n])):
        log.info(
            "cache_control at %s: the chat template renders this block after content that "
            "follows it, so no prefix of the prompt ends with it; skipped",
            mark.where,
        )
        return None
    return n


def pin_name(tokens: Sequence[int]) -> str:
    """The pin name of a breakpoint prefix: the same tokens, the same pin."""
    return PIN_PREFIX + hashlib.sha256(array("i", tokens).tobytes()).hexdigest()[:24]


def pin_breakpoints(
    cache: PrefixCache,
    request: MessagesRequest,
    full: list[int],
    namespace: str,
    *,
    ttl_scale: float = 1.0,
) -> Written:
    """Pin the prefix of each breakpoint of ``request`` (whose tokens are ``full``) for its TTL
    (times ``ttl_scale``), shortest first, on the model's thread.

    A prefix pinned already has its expiry moved to now + TTL (never earlier than it was); one
    not stored yet is prefilled and stored, and those tokens are what the request wrote. A pin
    the quota cannot hold is skipped with a warning: the request still runs. The tenant's other
    breakpoint pins that this request reads (a prefix of its prompt, with or without a
    breakpoint there now) get their TTL restarted, as a cache hit does at Anthropic; expired
    ones are unpinned.
    """
    ends: dict[int, str] = {}
    for mark in request.breakpoints:
        n = boundary(cache.template, request, mark, full)
        if n is not None and (n not in ends or TTLS[mark.ttl] > TTLS[ends[n]]):
            ends[n] = mark.ttl
    written = Written()
    pins = {p.name: p for p in cache.pins(namespace) if p.source == PIN_SOURCE}
    made = {pin_name(full[:n]) for n in ends}
    now = time.time()
    for pin in pins.values():
        if pin.name in made or pin.expires is None:
            continue
        if pin.expired(now):
            # An expired breakpoint pin protects nothing: drop its record (its segments are
            # ordinary LRU entries either way), so that an agent's pins do not pile up.
            cache.unpin(pin.name, namespace=namespace)
        elif pin.n_tokens <= len(full) and pin_name(full[: pin.n_tokens]) == pin.name:
            # This request reads it (its tokens are a prefix of the prompt): a hit refreshes.
            lasts = pin.expires - pin.created
            cache.store.set_pin(replace(pin, created=now, expires=now + lasts))
            written.refreshed.append(pin.name)
    for n in sorted(ends):
        ttl = ends[n]
        tokens = full[:n]
        name = pin_name(tokens)
        now = time.time()
        seconds = TTLS[ttl] * ttl_scale
        old = pins.get(name)
        if old is not None and old.expires is not None:
            seconds = max(seconds, old.expires - now)
        try:
            info = cache.pin(
                [], name, ttl=seconds, namespace=namespace, prefix_tokens=tokens, source=PIN_SOURCE
            )
        except QuotaExceededError as exc:
            log.warning("cache_control breakpoint of %d tokens not pinned: %s", n, exc)
            continue
        written.tokens += info.evaluated_tokens
        written.by_ttl[ttl] += info.evaluated_tokens
        written.pins.append(name)
    return written


__all__ = ["PIN_PREFIX", "PIN_SOURCE", "Written", "boundary", "pin_breakpoints", "pin_name"]
