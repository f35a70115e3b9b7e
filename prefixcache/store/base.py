"""The storage interface: bytes in, bytes out, metadata as JSON.

A backend stores three kinds of records: segments (JSON metadata plus raw KV bytes), pins (named
chains) and small JSON documents (calibration, quarantine notes). Visibility is the segment's
metadata record: it is written only after its bytes are complete, so a reader never sees half a
segment. Nothing here ever unpickles anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..segment import Pin, Segment, Usage


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection reclaimed."""

    orphans: int = 0  # KV bytes without metadata (a write cut short), removed
    broken: int = 0  # metadata without readable bytes, or whose parent is gone, removed
    expired_pins: int = 0
    bytes_freed: int = 0


@dataclass(frozen=True)
class StoreHealth:
    """Whether a shared store takes writes now, for ``status`` and metrics.

    ``used_bytes``/``limit_bytes`` are the server's memory and its limit (Redis ``maxmemory``;
    None when unknown or unlimited). ``reason`` says, in the server's words, why it refuses
    writes or cannot be reached; empty when all is well.
    """

    reachable: bool = True
    writable: bool = True
    reason: str = ""
    used_bytes: int | None = None
    limit_bytes: int | None = None


@dataclass(frozen=True)
class IndexDelta:
    """What changed among the segments of one root since a position in the store's change log.

    ``seq`` is the position to ask from next time (opaque: only ever passed back). With
    ``full`` set, ``added`` is the complete listing of the root and whatever else an index
    holds for it is gone; otherwise ``added`` are the segments stored and ``removed`` the keys
    deleted since, in log order.
    """

    seq: int
    added: tuple[Segment, ...] = ()
    removed: tuple[str, ...] = ()
    full: bool = False
    #: A full listing was due but the root holds more than the ``limit`` asked for: ``added``
    #: is empty (the index follows the root sparsely, see :meth:`ChangeLog.children`).
    over: bool = False


@runtime_checkable
class ChangeLog(Protocol):
    """A store that logs the changes to each root's segments (the disk and Redis stores).

    Indexes then follow the store at the cost of what changed, and never read another root's
    segments; a store without it is resynced by listing every key (see catalog.py).
    """

    def changes(self, root: str, since: int, *, limit: int | None = None) -> IndexDelta:
        """The changes to ``root``'s segments after ``since`` (-1: the full listing).

        A ``since`` the log no longer reaches back to (trimmed, or from another dataset)
        gets the full listing; with ``limit``, a full listing of more than ``limit`` segments
        is not read: the answer has ``over`` set and no rows (its cost stays bounded).
        """

    def children(self, root: str, heads: Iterable[str]) -> tuple[Segment, ...]:
        """Every stored segment of ``root`` whose :func:`~prefixcache.segment.head_key` is
        one of ``heads``, read in one query (one round trip).
        """


@runtime_checkable
class MapsKV(Protocol):
    """A store that can hand out a segment's KV bytes in place, without copying them (the disk
    store maps its files); the cache then checksums and restores from the mapping."""

    def map_kv(self, seg: Segment) -> AbstractContextManager[memoryview | None]:
        """The KV bytes (exactly ``seg.nbytes``), valid inside the block, or None where this
        segment cannot be mapped (read it with ``read_kv``).

        Raises CorruptSegmentError when the bytes are missing or of the wrong length.
        """


@runtime_checkable
class ReportsHealth(Protocol):
    """A store that can say whether it is reachable and takes writes (the Redis-backed ones)."""

    def health(self) -> StoreHealth:
        """Reachability and room, from a read-only probe (it never writes)."""


@runtime_checkable
class Store(Protocol):
    """What the cache needs from a storage backend."""

    url: str

    def put(self, seg: Segment, kv: Any) -> bool:
        """Store a segment (metadata + KV bytes, a bytes-like object). False if it existed."""

    def get(self, key: str) -> Segment | None:
        """The metadata of a complete segment, or None."""

    def read_kv(self, seg: Segment, into: memoryview) -> None:
        """Read the segment's KV bytes into ``into`` (exactly ``seg.nbytes`` long).

        Raises CorruptSegmentError when the bytes are missing or of the wrong length.
        """

    def keys(self) -> set[str]:
        """Keys of every complete segment (cheap: no metadata is parsed)."""

    def segments(self) -> Iterator[Segment]:
        """Every complete segment (unreadable metadata is skipped and logged)."""

    def delete(self, key: str) -> int:
        """Remove a segment; returns the bytes freed (0 if it was not there)."""

    def touch(self, key: str, now: float) -> None:
        """Count a hit and record the time of use."""

    def usage(self) -> dict[str, Usage]:
        """Hits and last use of every segment that has any."""

    def pins(self) -> list[Pin]:
        """Every pin record."""

    def set_pin(self, pin: Pin) -> None: ...

    def delete_pin(self, root: str, name: str) -> bool: ...

    def get_doc(self, name: str) -> dict[str, Any] | None:
        """A small JSON document (calibration figures, quarantine notes)."""

    def set_doc(self, name: str, doc: dict[str, Any]) -> None: ...

    def generation(self) -> int:
        """A counter bumped by every change to the set of segments (to resync indexes)."""

    def total_bytes(self) -> int:
        """KV bytes of all complete segments."""

    def lock(self, name: str, timeout: float = 600.0) -> AbstractContextManager[None]:
        """A lock shared by every process using this store."""

    def gc(self) -> GcReport:
        """Reclaim what interrupted writes left behind."""

    def close(self) -> None: ...
