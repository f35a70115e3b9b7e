"""Store lifecycle over any backend: pinned sets, quota enforcement and LRU eviction.

Pinned segments (every segment in the chain of a live pin) are never evicted. Everything else is
evicted least recently used first, and only leaves: a segment that another segment chains to
stays until its children are gone, so a stored chain never has a hole in the middle.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import QuotaExceededError
from .segment import Pin, Segment
from .store.base import Store

log = logging.getLogger(__name__)


def chain_keys(key: str, segments: dict[str, Segment]) -> list[str]:
    """``key`` and its stored ancestors, leaf first."""
    out = []
    k: str | None = key
    while k is not None and k in segments:
        out.append(k)
        k = segments[k].parent
    return out


def live_pins(store: Store, now: float) -> list[Pin]:
    return [p for p in store.pins() if not p.expired(now)]


def pinned_keys(store: Store, segments: dict[str, Segment], now: float) -> set[str]:
    """Every segment held by a pin whose TTL has not run out."""
    keys: set[str] = set()
    for pin in live_pins(store, now):
        keys.update(chain_keys(pin.key, segments))
    return keys


#: How long an eviction waits for another process's eviction to finish before giving up.
EVICTION_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Eviction:
    evicted: tuple[str, ...]
    bytes_freed: int
    total_bytes: int


def check_pin_quota(
    store: Store, quota_bytes: int | None, keys: Iterable[str], new_bytes: int, now: float
) -> None:
    """Refuse a pin whose segments would, with the other pins, exceed the quota.

    ``keys`` is the pin's whole chain: the stored segments it makes pinned (counted unless
    another pin holds them already) and the new ones, whose ``new_bytes`` are not stored yet.
    """
    if quota_bytes is None:
        return
    segments = {s.key: s for s in store.segments()}
    pinned = pinned_keys(store, segments, now)
    pinned_bytes = sum(segments[k].nbytes for k in pinned)
    extra = new_bytes + sum(segments[k].nbytes for k in set(keys) - pinned if k in segments)
    if pinned_bytes + extra > quota_bytes:
        raise QuotaExceededError(pinned_bytes, quota_bytes, extra)


def enforce_quota(
    store: Store, quota_bytes: int | None, now: float, protect: Iterable[str] = ()
) -> Eviction:
    """Evict unpinned leaves, least recently used first, until the store fits its quota."""
    total = store.total_bytes()
    if quota_bytes is None or total <= quota_bytes:
        return Eviction((), 0, total)
    with store.lock("evict", timeout=EVICTION_LOCK_TIMEOUT_S):
        segments = {s.key: s for s in store.segments()}
        total = sum(s.nbytes for s in segments.values())
        keep = pinned_keys(store, segments, now) | set(protect)
        usage = store.usage()
        children: dict[str, int] = dict.fromkeys(segments, 0)
        for seg in segments.values():
            if seg.parent in children:
                children[seg.parent] += 1

        def recency(key: str) -> tuple[float, str]:
            use = usage.get(key)
            return (use.last_used if use else segments[key].created, key)

        heap = [recency(k) for k, n in children.items() if n == 0 and k not in keep]
        heapq.heapify(heap)
        evicted: list[str] = []
        freed = 0
        while total > quota_bytes and heap:
            _, key = heapq.heappop(heap)
            n = store.delete(key)
            freed += n
            total -= segments[key].nbytes
            evicted.append(key)
            parent = segments[key].parent
            if parent in children:
                children[parent] -= 1
                if children[parent] == 0 and parent not in keep:
                    heapq.heappush(heap, recency(parent))
        if total > quota_bytes:
            log.warning(
                "store is %.3f GB over its quota and everything left is pinned or in use",
                (total - quota_bytes) / 1e9,
            )
        return Eviction(tuple(evicted), freed, total)
