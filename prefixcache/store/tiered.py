"""A shared remote store with a local tier in front: read-through, write-through, outage-proof.

Workers on many hosts share segments, pins, documents, usage and eviction through the remote
(Redis). Each host keeps a local DiskStore as a cache of it: a segment read from the remote is
written to the local tier and served from there next time, and every put goes to both. When the
remote cannot be reached the store says so once, carries on with the local tier alone (what is
not there is a miss: the model prefills it), tries the remote again every ``retry_after`` seconds
and says once when it is back. Connection errors never reach the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from ..errors import CorruptSegmentError, StoreError
from ..segment import Pin, Segment, Usage, checksum_matches
from .base import GcReport
from .disk import DiskStore
from .redis import RedisStore, StoreUnavailableError, redact

log = logging.getLogger(__name__)

#: Seconds between two attempts to reach a remote that was down.
DEFAULT_RETRY_AFTER_S = 3.0
#: generation() adds the outage epoch times this, so that switching tiers always changes it.
_EPOCH_STRIDE = 1 << 96  # above RedisStore's dataset id (bits 48..79)
#: Segments fetched from the remote wait at most this many at a time for their local copy.
_WRITE_BACK_QUEUE = 4

T = TypeVar("T")
_MISSING: Any = object()


class TieredStore:
    """A RedisStore shared by every worker, with a DiskStore on this host as its read cache.

    Args:
        local: the local tier (a cache of the remote: it may be emptied at any time).
        remote: the shared store; pins, documents, usage, generation and eviction come from it.
        retry_after: seconds to wait before trying a remote that could not be reached again.
    """

    def __init__(
        self, local: DiskStore, remote: RedisStore, *, retry_after: float = DEFAULT_RETRY_AFTER_S
    ):
        self.local = local
        self.remote = remote
        self.url = remote.url
        self.retry_after = retry_after
        self._state = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._epoch = 0  # bumped whenever the remote goes down or comes back
        self._pending: queue.Queue[tuple[Segment, bytes] | None] = queue.Queue(_WRITE_BACK_QUEUE)
        self._writer: threading.Thread | None = None
        self._try(remote.ping)  # an unreachable server is reported at open, not first use

    def __repr__(self) -> str:
        return f"TieredStore(local={self.local.url!r}, remote={redact(self.remote.url)!r})"

    # outage handling ------------------------------------------------------------------------

    @property
    def remote_up(self) -> bool:
        """False while the remote is considered unreachable."""
        return self._down_since is None

    def _try(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the remote, or _MISSING while it is down (never raises for that)."""
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return _MISSING
        try:
            value = fn(*args)
        except StoreUnavailableError as exc:
            self._went_down(exc)
            return _MISSING
        self._came_up()
        return value

    def _went_down(self, exc: BaseException) -> None:
        with self._state:
            now = time.monotonic()
            self._retry_at = now + self.retry_after
            if self._down_since is not None:
                return
            self._down_since = now
            self._epoch += 1
        log.warning(
            "shared store %s is unreachable (%s); carrying on with the local tier %s and "
            "retrying every %gs",
            redact(self.remote.url),
            exc.__cause__ or exc,
            self.local.url,
            self.retry_after,
        )

    def _came_up(self) -> None:
        if self._down_since is None:
            return
        with self._state:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._epoch += 1
        log.info(
            "shared store %s is reachable again after %.1fs; sharing resumes",
            redact(self.remote.url),
            down_for,
        )

    def _read(self, remote: Callable[..., T], local: Callable[..., T], *args: Any) -> T:
        """The remote's answer, or the local tier's while the remote is down."""
        value = self._try(remote, *args)
        return local(*args) if value is _MISSING else value

    # segments -------------------------------------------------------------------------------

    def put(self, seg: Segment, kv: Any) -> bool:
        stored = self.local.put(seg, kv)
        shared = self._try(self.remote.put, seg, kv)
        return stored if shared is _MISSING else shared

    def get(self, key: str) -> Segment | None:
        return self._read(self.remote.get, self.local.get, key)

    def read_kv(self, seg: Segment, into: memoryview) -> None:
        if self._read_local(seg, into):
            return
        if self._try(self.remote.read_kv, seg, into) is _MISSING:
            raise CorruptSegmentError(seg.key, "the shared store became unreachable")
        # Keep a copy here, written by a background thread: writing it now would about double
        # the time to first token. (The cache checks the checksum; a bad copy is deleted with
        # the rest.) When copies queue up, this one is skipped: the next read fetches it again.
        try:
            self._pending.put_nowait((seg, bytes(into[: seg.nbytes])))
        except queue.Full:
            return
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_back, name="prefixcache-write-back", daemon=True
            )
            self._writer.start()

    def _read_local(self, seg: Segment, into: memoryview) -> bool:
        """Read the local copy if it is whole; drop a damaged one (the remote's may be fine).

        The checksum is checked here, not only by the cache, because a cache that finds a bad
        segment quarantines it everywhere, and a bad local copy says nothing about the remote.
        """
        try:
            mine = self.local.get(seg.key)
            if mine is None or (mine.checksum, mine.nbytes) != (seg.checksum, seg.nbytes):
                return False
            self.local.read_kv(seg, into)
            if checksum_matches(into[: seg.nbytes], seg.checksum):
                return True
            reason = "checksum mismatch"
        except CorruptSegmentError as exc:
            reason = exc.reason
        log.warning("dropping the local copy of segment %s: %s", seg.key[:16], reason)
        self.local.delete(seg.key)
        return False

    def _write_back(self) -> None:
        while (item := self._pending.get()) is not None:
            seg, data = item
            try:
                mine = self.local.get(seg.key)
                if mine is not None and mine.checksum != seg.checksum:
                    self.local.delete(seg.key)  # another writer's bytes for the same tokens
                self.local.put(seg, data)
            except StoreError as exc:
                log.warning("cannot keep segment %s in the local tier: %s", seg.key[:16], exc)
            finally:
                self._pending.task_done()

    def flush(self) -> None:
        """Wait until the segments fetched from the remote are written to the local tier."""
        self._pending.join()

    def keys(self) -> set[str]:
        return self._read(self.remote.keys, self.local.keys)

    def segments(self) -> Iterator[Segment]:
        return iter(self._read(lambda: list(self.remote.segments()), self._local_segments))

    def _local_segments(self) -> list[Segment]:
        return list(self.local.segments())

    def delete(self, key: str) -> int:
        freed = self.local.delete(key)
        shared = self._try(self.remote.delete, key)
        return freed if shared is _MISSING else shared

    def touch(self, key: str, now: float) -> None:
        if self._try(self.remote.touch, key, now) is _MISSING:
            self.local.touch(key, now)

    def usage(self) -> dict[str, Usage]:
        return self._read(self.remote.usage, self.local.usage)

    # pins and documents (written to both, so that an outage still sees them) ---------------

    def pins(self) -> list[Pin]:
        return self._read(self.remote.pins, self.local.pins)

    def set_pin(self, pin: Pin) -> None:
        self.local.set_pin(pin)
        self._try(self.remote.set_pin, pin)

    def delete_pin(self, root: str, name: str) -> bool:
        found = self.local.delete_pin(root, name)
        shared = self._try(self.remote.delete_pin, root, name)
        return found if shared is _MISSING else shared

    def get_doc(self, name: str) -> dict[str, Any] | None:
        return self._read(self.remote.get_doc, self.local.get_doc, name)

    def set_doc(self, name: str, doc: dict[str, Any]) -> None:
        self.local.set_doc(name, doc)
        self._try(self.remote.set_doc, name, doc)

    # housekeeping ---------------------------------------------------------------------------

    def generation(self) -> int:
        """The remote's generation, or the local tier's during an outage.

        Every switch between the two bumps an epoch that is added on top, so an index built
        from one tier is always rebuilt from the other when the remote goes down or comes back.
        """
        gen = self._read(self.remote.generation, self.local.generation)
        return self._epoch * _EPOCH_STRIDE + gen

    def total_bytes(self) -> int:
        return self._read(self.remote.total_bytes, self.local.total_bytes)

    def lock(self, name: str, timeout: float = 600.0) -> AbstractContextManager[None]:
        return self._lock(name, timeout)

    @contextmanager
    def _lock(self, name: str, timeout: float) -> Iterator[None]:
        """The remote's lock (shared by every host), or the local one during an outage."""
        held = self._try(self._acquire, name, timeout)
        if held is _MISSING:
            with self.local.lock(name, timeout):
                yield
            return
        try:
            yield
        finally:
            try:
                held.__exit__(None, None, None)
            except StoreUnavailableError as exc:
                self._went_down(exc)  # the lock expires on the server by itself

    def _acquire(self, name: str, timeout: float) -> AbstractContextManager[None]:
        cm = self.remote.lock(name, timeout)
        cm.__enter__()
        return cm

    def gc(self) -> GcReport:
        """gc() on both tiers, and drop local copies of segments the remote no longer has."""
        self.flush()
        shared = self._try(self.remote.gc)
        stale = 0
        if shared is not _MISSING:
            keys = self._try(self.remote.keys)
            if keys is not _MISSING:
                for key in self.local.keys() - keys:
                    stale += self.local.delete(key)
        mine = self.local.gc()
        if shared is _MISSING:
            return mine
        return GcReport(
            orphans=shared.orphans + mine.orphans,
            broken=shared.broken + mine.broken,
            expired_pins=shared.expired_pins + mine.expired_pins,
            bytes_freed=shared.bytes_freed + mine.bytes_freed + stale,
        )

    def close(self) -> None:
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
            self._writer = None
        self.local.close()
        self.remote.close()
