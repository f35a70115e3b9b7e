"""Why a request restores what it does: where it leaves the nearest stored prefix, and why.

Frameworks rewrite what they send (openai-agents adds ``strict`` and ``additionalProperties`` to
tool schemas, smolagents replaces the system prompt, a lost trailing newline changes the rest of a
message), and a request that differs from a 438-token pinned prefix at token 387 restores 387
tokens, silently. Two entry points say so:

- :func:`check_restore` runs on every call, on the radix match the restore has made anyway. It
  does nothing more when the match covers the prompt or the prompt only goes on past what is
  stored (a full hit, the next turn of an agent loop); only when the prompt leaves a stored
  prefix does it read the pins and find the one it left (a :class:`Divergence`: the counter by
  reason in ``stats()["partial_restores"]``, a debug log line, the server's
  ``x-prefixcache-diverged`` header).
- :func:`explain` (``PrefixCache.explain``, ``prefixcache explain``) tokenizes a request and looks
  it up: how far each pin matches, where the request leaves the nearest stored prefix, and the
  text on both sides (an :class:`Explanation`). No model work; the live KV is not touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .catalog import Known
from .errors import StoreError
from .radix import Match, RadixIndex, as_tokens, common_prefix_length
from .request import normalise_chat
from .segment import Pin
from .store import Store

if TYPE_CHECKING:
    from .cache import PrefixCache

log = logging.getLogger(__name__)

# What a request's restore stopped at (``Divergence.kind``, the ``reason`` label in /metrics).
#: It leaves a pinned prefix before that prefix's end.
DIVERGED_IN_PIN = "diverged_in_pin"
#: It leaves a stored prefix that is not pinned (an autosaved conversation; after a whole pin).
DIVERGED = "diverged"
#: Not even its first token is stored (other segments are).
NO_MATCH = "no_match"
#: The index holds more of it than could be restored (a corrupt or refused segment, the store).
RESTORE_FAILED = "restore_failed"
# What an explanation can say besides (``Explanation.kind``).
#: Every prompt token is stored.
FULL = "full"
#: The prompt goes on past a stored prefix that ends where it does: nothing stored is lost.
EXTENDS = "extends"
#: Nothing is stored for this model in this namespace.
EMPTY = "empty"

#: Every ``Divergence.kind``, the reasons counted in ``stats()["partial_restores"]``.
REASONS = (DIVERGED_IN_PIN, DIVERGED, NO_MATCH, RESTORE_FAILED)

#: Characters of text shown on each side of a divergence, and the tokens decoded to get them.
WINDOW_CHARS = 40
_WINDOW_TOKENS = 48

Detokenize = Callable[[Sequence[int]], str]

#: Seconds a list of pins read for a call may serve later calls while other writes go on.
PINS_MAX_AGE = 2.0


@dataclass(frozen=True)
class Divergence:
    """Where a request left a stored prefix: ``at`` tokens are stored, token ``at`` differs.

    ``of`` is the length of the stored prefix it left (the pin's tokens, or the end of the
    stored segment it left); ``key`` that prefix's last segment.
    """

    kind: str
    at: int
    of: int
    pin: str | None = None
    key: str | None = None

    def header(self) -> str:
        """The ``x-prefixcache-diverged`` header value, e.g. ``pin=support-bot; at=387; of=438``."""
        head = f"pin={self.pin}; " if self.pin is not None else f"reason={self.kind}; "
        return f"{head}at={self.at}; of={self.of}"


@dataclass(frozen=True)
class PinMatch:
    """How far a request matches one pin: its first ``matched`` of ``n_tokens`` tokens."""

    name: str
    n_tokens: int
    matched: int
    key: str

    @property
    def whole(self) -> bool:
        return self.matched >= self.n_tokens


@dataclass(frozen=True)
class Explanation:
    """Why a request restores what it does (see :meth:`PrefixCache.explain`).

    ``matched_tokens`` is what the store holds of the prompt now; a call's ``cached_tokens`` may
    be a little less (the last prompt token is always evaluated, and the restore point is kept on
    a batch boundary so that output stays identical to a cold run). ``pins`` are the
    namespace's pins, nearest (longest match) first. Where the request leaves a stored prefix,
    ``divergence`` says where, and ``before`` (the shared text just before it), ``stored_after``
    and ``request_after`` (what follows in the stored prefix and in the request) show why.
    """

    kind: str
    prompt_tokens: int
    matched_tokens: int
    pins: tuple[PinMatch, ...] = ()
    divergence: Divergence | None = None
    before: str = ""
    stored_after: str = ""
    request_after: str = ""
    namespace: str = ""

    @property
    def diverged_at(self) -> int | None:
        return None if self.divergence is None else self.divergence.at

    @property
    def pin(self) -> PinMatch | None:
        """The pin the request left, else the nearest pin (None without pins)."""
        if self.divergence is not None and self.divergence.pin is not None:
            return next((p for p in self.pins if p.name == self.divergence.pin), None)
        return self.pins[0] if self.pins else None

    @property
    def stored_text(self) -> str:
        """The stored prefix's text around the divergence."""
        return self.before + self.stored_after

    @property
    def request_text(self) -> str:
        """The request's text around the divergence."""
        return self.before + self.request_after

    @property
    def reason(self) -> str:
        """One line for people: what is restored and, for a miss, where and why."""
        n, m = self.prompt_tokens, self.matched_tokens
        d = self.divergence
        texts = (
            f": stored {_quote(self.before, self.stored_after)}"
            f" vs request {_quote(self.before, self.request_after)}"
        )
        if self.kind == EMPTY:
            return f"0 of {n} tokens stored: nothing is stored for this model in this namespace"
        if self.kind == FULL:
            return f"all {n} prompt tokens are stored"
        if self.kind == NO_MATCH:
            return f"0 of {n} tokens stored: no stored prefix starts like this request{texts}"
        if d is not None and self.kind == DIVERGED_IN_PIN:
            return (
                f"{m} of {n} tokens stored: the request leaves pin {d.pin!r} at token {d.at} "
                f"of its {d.of}{texts}"
            )
        whole = max((p for p in self.pins if p.whole), key=lambda p: p.n_tokens, default=None)
        held = f" (pin {whole.name!r} whole)" if whole is not None else ""
        if d is not None and self.kind == DIVERGED:
            return (
                f"{m} of {n} tokens stored{held}: the request leaves a stored prefix that is not "
                f"pinned ({d.of} tokens) at token {d.at}{texts}"
            )
        return f"{m} of {n} tokens stored{held}; the rest of the prompt is new"

    def __str__(self) -> str:
        return self.reason

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``reason`` and ``diverged_at``, for JSON."""
        out = asdict(self)
        out["reason"] = self.reason
        out["diverged_at"] = self.diverged_at
        return out


class PinReader:
    """The pins of one store for :func:`check_restore`, read again only when they may have changed.

    A disk store lists its pins by walking all its keys (75 ms at 10,000 segments), and in a busy
    store the generation moves on every call, so a list read for one call serves the next ones
    for :data:`PINS_MAX_AGE` seconds, or as long as the store does not change; :meth:`clear`
    (this process pinned or unpinned) makes the next call read them again. A pin made by another
    process is thus seen at most that long after.
    """

    def __init__(self, store: Store, max_age: float = PINS_MAX_AGE):
        self.store = store
        self.max_age = max_age
        self._pins: list[Pin] | None = None
        self._generation = -1
        self._read_at = 0.0

    def __call__(self, root: str) -> list[Pin]:
        generation = self.store.generation()
        now = time.monotonic()
        stale = generation != self._generation and now - self._read_at > self.max_age
        if self._pins is None or stale:
            self._pins = self.store.pins()
            self._generation, self._read_at = generation, now
        return [p for p in self._pins if p.root == root]

    def clear(self) -> None:
        self._pins = None


# --- the pure part: a radix index, pins and tokens in, a divergence out -----------------------


def pin_matches(index: RadixIndex, pins: Iterable[Pin], tokens: Sequence[int]) -> list[PinMatch]:
    """How far ``tokens`` match each pin whose segments are indexed, nearest first.

    Expired pins (ordinary LRU entries now) are left out.
    """
    toks = as_tokens(tokens)
    now = time.time()
    out = []
    for pin in pins:
        if pin.expired(now) or pin.key not in index:
            continue
        path = index.tokens(pin.key)
        out.append(PinMatch(pin.name, len(path), common_prefix_length(path, toks), pin.key))
    out.sort(key=lambda m: (-m.matched, m.n_tokens, m.name))
    return out


def _onward(known: Known, match: Match) -> list[str]:
    """Stored segments that go on past where ``match`` stopped (their tokens there differ)."""
    if not match.chain:
        return known.index.roots()
    last = match.chain[-1]
    if match.chain_end > match.length:
        return [last]
    return list(known.index.children(last))


def _divergence(
    known: Known, match: Match, onward: Sequence[str], matches: Sequence[PinMatch]
) -> Divergence | None:
    """The divergence at ``match.length``: the pin it falls inside, if any, else the most
    recently stored segment that goes on past it; None when nothing does."""
    at = match.length
    inside = [m for m in matches if m.matched == at and m.n_tokens > at]
    # A prompt that holds a whole pin ending right here has what that pin is for (a team-base
    # request, not a team-reviewer one that extends it): that is not a miss in a pin.
    ends_here = any(m.whole and m.n_tokens == at for m in matches)
    if at > 0 and inside and not ends_here:
        pin = min(inside, key=lambda m: (m.n_tokens, m.name))
        return Divergence(DIVERGED_IN_PIN, at, pin.n_tokens, pin.name, pin.key)
    if not onward:
        return None

    def created(key: str) -> tuple[float, str]:
        seg = known.segments.get(key)
        return (seg.created if seg is not None else 0.0, key)

    key = max(onward, key=created)
    return Divergence(DIVERGED if at > 0 else NO_MATCH, at, known.index.span(key)[1], None, key)


def diagnose(
    known: Known, match: Match, tokens: Sequence[int], pins: Callable[[], Iterable[Pin]]
) -> Divergence | None:
    """Where a prompt leaves what is stored, from the match its restore made; None when it
    does not (the match covers it, or the prompt only goes on past what is stored).

    ``pins`` is called only for a prompt that leaves a stored prefix, so a full hit or the next
    turn of a conversation costs nothing more than two comparisons.
    """
    if match.length >= len(tokens) or not len(known.index):
        return None
    onward = _onward(known, match)
    if not onward:
        return None
    return _divergence(known, match, onward, pin_matches(known.index, pins(), tokens))


def check_restore(
    known: Known,
    match: Match,
    tokens: Sequence[int],
    pins: Callable[[], Iterable[Pin]],
    detokenize: Detokenize,
) -> Divergence | None:
    """:func:`diagnose` for a call's restore, with its debug log line.

    A store that cannot list its pins only makes the answer less precise: never fails a call.
    """

    def read_pins() -> Iterable[Pin]:
        try:
            return pins()
        except (StoreError, OSError) as exc:
            log.debug("cannot read the pins to explain a partial restore: %s", exc)
            return ()

    diverged = diagnose(known, match, tokens, read_pins)
    if diverged is not None and log.isEnabledFor(logging.DEBUG):
        before, stored, request = _texts(known.index, diverged, tokens, detokenize)
        where = f"pin {diverged.pin!r}" if diverged.pin is not None else "a stored prefix"
        log.debug(
            "%s: the prompt (%d tokens) leaves %s at token %d of %d: stored %s vs request %s",
            diverged.kind,
            len(tokens),
            where,
            diverged.at,
            diverged.of,
            _quote(before, stored),
            _quote(before, request),
        )
    return diverged


def restore_failed(cached: int, matched: int) -> Divergence:
    """A restore that stopped at ``cached`` of the ``matched`` tokens the index holds."""
    log.debug(
        "%s: %d of the %d stored tokens restored (a segment could not be)",
        RESTORE_FAILED,
        cached,
        matched,
    )
    return Divergence(RESTORE_FAILED, cached, matched)


def _texts(
    index: RadixIndex, d: Divergence, tokens: Sequence[int], detokenize: Detokenize
) -> tuple[str, str, str]:
    """The shared text before ``d.at``, and what follows it in the stored prefix and the prompt."""
    if d.key is None or d.key not in index:
        return "", "", ""
    stored = index.tokens(d.key)
    at = d.at
    before = detokenize(list(tokens[max(0, at - _WINDOW_TOKENS) : at]))[-WINDOW_CHARS:]
    after_stored = detokenize(list(stored[at : at + _WINDOW_TOKENS]))[:WINDOW_CHARS]
    after_request = detokenize(list(tokens[at : at + _WINDOW_TOKENS]))[:WINDOW_CHARS]
    return before, after_stored, after_request


def _quote(before: str, after: str) -> str:
    """``before|after`` as one escaped, quoted line (newlines shown as ``\\n``)."""
    return repr(f"…{before}⟩{after}…")


def explain_tokens(
    known: Known,
    tokens: Sequence[int],
    pins: Iterable[Pin],
    detokenize: Detokenize,
    namespace: str = "",
) -> Explanation:
    """The explanation for a prompt's tokens against one namespace's index (no model work)."""
    index = known.index
    if not len(index):
        return Explanation(EMPTY, len(tokens), 0, namespace=namespace)
    match = index.match(tokens)
    matches = tuple(pin_matches(index, pins, tokens))
    if match.length >= len(tokens):
        return Explanation(FULL, len(tokens), match.length, matches, namespace=namespace)
    diverged = _divergence(known, match, _onward(known, match), matches)
    if diverged is None:
        return Explanation(EXTENDS, len(tokens), match.length, matches, namespace=namespace)
    before, stored, request = _texts(index, diverged, tokens, detokenize)
    return Explanation(
        diverged.kind,
        len(tokens),
        match.length,
        matches,
        diverged,
        before,
        stored,
        request,
        namespace,
    )


def explain(
    cache: PrefixCache,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    namespace: str | None,
    request: Mapping[str, Any],
) -> Explanation:
    """See :meth:`PrefixCache.explain`."""
    call = normalise_chat(messages, tools, **request)
    ns = cache.namespace if namespace is None else namespace
    with cache._lock:
        tokens = cache.template.tokens(call.messages, call.tools)
        known = cache.catalog.sync(ns, tokens)
        pins = cache.catalog.with_pins(known, cache.pins(ns))
        return explain_tokens(known, tokens, pins, cache.template.detokenize, ns)


__all__ = [
    "DIVERGED",
    "DIVERGED_IN_PIN",
    "EMPTY",
    "EXTENDS",
    "FULL",
    "NO_MATCH",
    "REASONS",
    "RESTORE_FAILED",
    "Divergence",
    "Explanation",
    "PinMatch",
    "PinReader",
    "check_restore",
    "diagnose",
    "explain",
    "explain_tokens",
    "pin_matches",
    "restore_failed",
]
