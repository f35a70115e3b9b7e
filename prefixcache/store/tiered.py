"""A shared remote store with a local tier in front: read-through, write-through, outage-proof.

Workers on many hosts share segments, pins, documents, usage and eviction through the remote
(Redis). Each host keeps a local DiskStore as a cache of it: a segment read from the remote is
written to the local tier and served from there next time, and every put goes to both. When the
remote cannot be reached the store says so once, carries on with the local tier alone (what is
not there is a miss: the model prefills it), tries the remote again every ``retry_after`` seconds
and says once when it is back. Connection errors never reach the cache.

When the remote is full (Redis at ``maxmemory``) it is read-only: restores go on, and new
segments stay in the local tier, visible to this process, until a later put (tried every
``retry_after`` seconds) goes through again.

The local tier has a quota of its own: past it, the least recently used local copies are dropped
in the background (any copy the remote holds; of the segments only this tier holds, unpinned
leaves only).
"""

from __future__ import annotations

import heapq
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, TypeVar

from ..errors import CorruptSegmentError, StoreError, StoreFullError
from ..lifecycle import pinned_keys
from ..segment import Pin, Segment, Usage, checksum_matches, head_key
from .base import GcReport, IndexDelta, StoreHealth
from .disk import DiskStore
from .redis import RedisStore, StoreUnavailableError, redact

log = logging.getLogger(__name__)

#: Seconds between two attempts to reach a remote that was down, or to write to one that was full.
DEFAULT_RETRY_AFTER_S = 3.0
#: The local tier's default quota: at most this many GB ...
DEFAULT_LOCAL_GB = 20.0
#: ... and at most this share of the disk space it could use (free space plus its own bytes).
DEFAULT_LOCAL_DISK_SHARE = 0.5
#: Copies of segments fetched from the remote wait for the local tier in at most this many bytes
#: (or one segment, when a single one is larger).
DEFAULT_WRITE_BACK_MB = 256.0
#: A local tier over its quota is shrunk to this share of it, so that it is not shrunk again at
#: the very next put.
_LOW_WATER = 0.9
#: generation() adds the outage epoch times this, so that switching tiers always changes it.
_EPOCH_STRIDE = 1 << 96  # above RedisStore's dataset id (bits 48..79)

T = TypeVar("T")
_MISSING: Any = object()


def default_local_quota(local: DiskStore) -> int:
    """The local tier's quota when none is given: 20 GB, or half the disk space it could use."""
    free = shutil.disk_usage(local.path).free
    return int(min(DEFAULT_LOCAL_GB * 1e9, DEFAULT_LOCAL_DISK_SHARE * (free + local.total_bytes())))


class TieredStore:
    """A RedisStore shared by every worker, with a DiskStore on this host as its read cache.

    Args:
        local: the local tier (a cache of the remote: it may be emptied at any time).
        remote: the shared store; pins, documents, usage, generation and eviction come from it.
        retry_after: seconds to wait before trying a remote that could not be reached (or that
            refused a write) again.
        local_quota: bytes the local tier may hold (None: :func:`default_local_quota`); past
            it, least recently used local copies are dropped.
        write_back_bytes: bytes of fetched segments that may wait for their local copy; a copy
            that does not fit is skipped (counted): the next read fetches it again.
    """

    def __init__(
        self,
        local: DiskStore,
        remote: RedisStore,
        *,
        retry_after: float = DEFAULT_RETRY_AFTER_S,
        local_quota: int | None = None,
        write_back_bytes: int = int(DEFAULT_WRITE_BACK_MB * 2**20),
    ):
        self.local = local
        self.remote = remote
        self.url = remote.url
        self.retry_after = retry_after
        self.local_quota = default_local_quota(local) if local_quota is None else local_quota
        self.write_back_bytes = write_back_bytes
        self._state = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._epoch = 0  # bumped whenever the remote goes down or comes back
        # Segments kept here because the remote refused them (full), visible to this process
        # (key -> bytes), and a count of changes to that set, which generation() adds.
        self._local_only: dict[str, int] = {}
        self._changes = 0
        self._full_until = 0.0  # no put is sent to a full remote before this (monotonic)
        # The background writer: local copies of fetched segments, and shrinking the tier.
        self._work = threading.Condition()
        self._pending: deque[tuple[Segment, bytes]] = deque()
        self._pending_bytes = 0  # waiting or being written
        self._busy = False
        self._shrink = False
        self._closing = False
        self._writer: threading.Thread | None = None
        self.kept_local = 0
        self.write_backs_dropped = 0
        self.local_evicted = 0
        self.local_evicted_bytes = 0
        self._try(remote.ping)  # an unreachable server is reported at open, not first use

    def __repr__(self) -> str:
        return f"TieredStore(local={self.local.url!r}, remote={redact(self.remote.url)!r})"

    # outage handling ------------------------------------------------------------------------

    @property
    def remote_up(self) -> bool:
        """False while the remote is considered unreachable."""
        return self._down_since is None

    @property
    def remote_full(self) -> bool:
        """True while new segments stay in the local tier because the remote refused them."""
        return bool(self._local_only) or time.monotonic() < self._full_until

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
            # The server may have restarted empty: try it at once, and rebuild from it alone.
            self._local_only.clear()
            self._full_until = 0.0
        log.info(
            "shared store %s is reachable again after %.1fs; sharing resumes",
            redact(self.remote.url),
            down_for,
        )

    def _read(self, remote: Callable[..., T], local: Callable[..., T], *args: Any) -> T:
        """The remote's answer, or the local tier's while the remote is down."""
        value = self._try(remote, *args)
        return local(*args) if value is _MISSING else value

    # a full remote --------------------------------------------------------------------------

    def _keep_local(self, seg: Segment, stored: bool) -> bool:
        """The remote refuses writes: keep ``seg`` in the local tier, visible to this process."""
        there = self._try(self.remote.get, seg.key)
        if there is _MISSING:
            return stored  # down meanwhile: the outage path
        with self._state:
            if there is not None or seg.key in self._local_only:
                return False  # shared already (another worker stored it), or kept before
            self._local_only[seg.key] = seg.nbytes
            self._changes += 1
        self.kept_local += 1
        if self.kept_local == 1:
            log.info(
                "keeping new segments in the local tier %s while the shared store is full",
                self.local.url,
            )
        return True

    def _room_again(self) -> None:
        """The remote takes writes again: forget the local-only segments, rebuild from it.

        They are not uploaded (nor are the segments of an outage): the next call that prefills
        them stores them again, into the shared store. The epoch makes every index rebuild.
        """
        with self._state:
            self._full_until = 0.0
            if not self._local_only:
                return
            self._local_only.clear()
            self._epoch += 1
        log.info("shared store %s has room again; sharing new segments", redact(self.remote.url))

    def _has_room(self, nbytes: int) -> bool:
        """Whether the remote looks able to take ``nbytes`` now (a read-only probe)."""
        health = self.remote.health()
        if not health.writable:
            return False
        if health.limit_bytes is None or health.used_bytes is None:
            return True
        return health.limit_bytes - health.used_bytes > nbytes + self.remote.part_bytes

    # segments -------------------------------------------------------------------------------

    def put(self, seg: Segment, kv: Any) -> bool:
        stored = self.local.put(seg, kv)
        self._check_local_quota()
        if time.monotonic() < self._full_until:
            return self._keep_local(seg, stored)
        if seg.parent in self._local_only:
            # Never share a segment whose parent is not shared. Probe (no write) every
            # retry_after seconds: with room again, the next call re-stores the whole chain.
            self._full_until = time.monotonic() + self.retry_after
            if self._try(self._has_room, seg.nbytes) is True:
                self._room_again()
                return False
            return self._keep_local(seg, stored)
        try:
            shared = self._try(self.remote.put, seg, kv)
        except StoreFullError:
            self._full_until = time.monotonic() + self.retry_after
            return self._keep_local(seg, stored)
        if shared is _MISSING:
            return stored
        self._room_again()
        return shared

    def get(self, key: str) -> Segment | None:
        seg = self._read(self.remote.get, self.local.get, key)
        if seg is None and key in self._local_only:
            seg = self.local.get(key)
            if seg is None:
                self._forget_local_only(key)
        return seg

    def read_kv(self, seg: Segment, into: memoryview) -> None:
        if self._read_local(seg, into):
            return
        if self._try(self.remote.read_kv, seg, into) is _MISSING:
            raise StoreUnavailableError(
                f"segment {seg.key[:16]} is not in the local tier and the shared store "
                f"{redact(self.remote.url)} is unreachable"
            )
        self._queue_copy(seg, into)

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
            if self.local.get(seg.key) is None:
                return False  # evicted from this tier (by its quota) while being read
            reason = exc.reason
        log.warning("dropping the local copy of segment %s: %s", seg.key[:16], reason)
        self.local.delete(seg.key)
        return False

    def keys(self) -> set[str]:
        shared = self._try(self.remote.keys)
        if shared is _MISSING:
            return self.local.keys()
        with self._state:
            return shared | self._local_only.keys()

    def changes(self, root: str, since: int, *, limit: int | None = None) -> IndexDelta:
        """The remote's change log, or the local tier's during an outage.

        Positions carry the tier they come from and its epoch (as :meth:`generation` does), so
        an index follows the remote's log while it is up and is rebuilt from the other tier
        whenever the remote goes down, comes back or the segments kept only here change.
        """
        for _ in range(3):
            with self._state:
                tag = (self._epoch << 20) + self._changes
            inner = since % _EPOCH_STRIDE if since >= 0 and since // _EPOCH_STRIDE == tag else -1
            delta = self._try(lambda i=inner: self.remote.changes(root, i, limit=limit))
            if delta is _MISSING:
                delta = self.local.changes(root, inner, limit=limit)
            with self._state:
                switched = (self._epoch << 20) + self._changes != tag
                local_only = list(self._local_only)
            if not switched:
                break
            # The tier switched during the call: only a full listing can be trusted, and
            # its position belongs to no tier (the next call lists again).
            if delta.full:
                tag = -1
                break
            since = -1
        added = delta.added
        if delta.full and not delta.over and local_only:
            have = {s.key for s in added}
            extra = [s for k in local_only if k not in have and (s := self.local.get(k))]
            added = added + tuple(s for s in extra if s.root == root)
        return IndexDelta(
            seq=-1 if tag < 0 else tag * _EPOCH_STRIDE + delta.seq,
            added=added,
            removed=delta.removed,
            full=delta.full,
            over=delta.over,
        )

    def children(self, root: str, heads: Iterable[str]) -> tuple[Segment, ...]:
        """The segments with these heads in the tier :meth:`changes` follows now, and those
        only the local tier holds."""
        wanted = set(heads)
        found = self._try(self.remote.children, root, wanted)
        if found is _MISSING:
            found = self.local.children(root, wanted)
        with self._state:
            local_only = list(self._local_only)
        if local_only:
            have = {s.key for s in found}
            extra = [s for k in local_only if k not in have and (s := self.local.get(k))]
            found = found + tuple(
                s for s in extra if s.root == root and head_key(s.parent, s.tokens) in wanted
            )
        return found

    def segments(self) -> Iterator[Segment]:
        shared = self._try(lambda: list(self.remote.segments()))
        if shared is _MISSING:
            return iter(list(self.local.segments()))
        seen = {s.key for s in shared}
        with self._state:
            mine = [k for k in self._local_only if k not in seen]
        return iter(shared + [s for k in mine if (s := self.local.get(k)) is not None])

    def delete(self, key: str) -> int:
        freed = self.local.delete(key)
        if self._forget_local_only(key):
            return freed
        shared = self._try(self.remote.delete, key)
        return freed if shared is _MISSING else shared

    def _forget_local_only(self, key: str) -> bool:
        with self._state:
            if self._local_only.pop(key, None) is None:
                return False
            self._changes += 1
            return True

    def touch(self, key: str, now: float) -> None:
        """Count a hit in the remote (skipped while it is full), and here for the tier's LRU."""
        self._try(self.remote.touch, key, now)
        with suppress(StoreError):
            self.local.touch(key, now)

    def usage(self) -> dict[str, Usage]:
        shared = self._try(self.remote.usage)
        if shared is _MISSING:
            return self.local.usage()
        if self._local_only:
            mine = self.local.usage()
            shared.update({k: mine[k] for k in list(self._local_only) if k in mine})
        return shared

    # the background writer: local copies, and the local tier's quota --------------------------

    def _queue_copy(self, seg: Segment, data: memoryview) -> None:
        """Keep a copy of a fetched segment here, written by the background thread.

        Writing it now would about double the time to first token. The copies that wait are
        bounded in bytes: one that does not fit is skipped rather than waited for (blocking
        would delay this restore for a copy that only speeds up a later one); the next read
        of that segment fetches it again. (The cache checks the checksum; a bad copy is
        deleted with the rest.)
        """
        with self._work:
            if self._closing:
                return
            if self._pending_bytes and self._pending_bytes + seg.nbytes > self.write_back_bytes:
                self.write_backs_dropped += 1
                level = logging.INFO if self.write_backs_dropped == 1 else logging.DEBUG
                log.log(
                    level,
                    "local tier busy (%.0f MB of copies waiting, limit %.0f MB): segment %s is "
                    "not copied to %s this time (%d skipped so far)",
                    self._pending_bytes / 2**20,
                    self.write_back_bytes / 2**20,
                    seg.key[:16],
                    self.local.url,
                    self.write_backs_dropped,
                )
                return
            self._pending_bytes += seg.nbytes
        copy = bytes(data[: seg.nbytes])
        with self._work:
            if self._closing:
                self._pending_bytes -= seg.nbytes
                return
            self._pending.append((seg, copy))
            self._start_writer()

    def _start_writer(self) -> None:
        """Wake the writer thread, starting it if needed (``self._work`` held)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="prefixcache-write-back", daemon=True
            )
            self._writer.start()
        self._work.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._work:
                while not (self._pending or self._shrink or self._closing):
                    self._work.wait()
                item = self._pending.popleft() if self._pending else None
                if item is None and not self._shrink:
                    return  # closing, and nothing left to do
                if item is None:
                    self._shrink = False
                self._busy = True
            try:
                if item is not None:
                    self._write_copy(*item)
                else:
                    self.shrink_local()
            finally:
                with self._work:
                    if item is not None:
                        self._pending_bytes -= item[0].nbytes
                    self._busy = False
                    self._work.notify_all()

    def _write_copy(self, seg: Segment, data: bytes) -> None:
        try:
            mine = self.local.get(seg.key)
            if mine is not None and mine.checksum != seg.checksum:
                self.local.delete(seg.key)  # another writer's bytes for the same tokens
            self.local.put(seg, data)
        except StoreError as exc:
            log.warning("cannot keep segment %s in the local tier: %s", seg.key[:16], exc)
            return
        self._check_local_quota()

    def _check_local_quota(self) -> None:
        """Have the writer shrink the local tier if it is over its quota (a cheap check)."""
        if self.local.total_bytes() <= self.local_quota:
            return
        with self._work:
            if not self._closing:
                self._shrink = True
                self._start_writer()

    def shrink_local(self) -> int:
        """Drop least recently used local copies until the tier is under its quota.

        Copies of segments the remote holds can all go (they are fetched again when needed).
        A segment only this tier holds (stored during an outage or while the remote was full)
        is lost when dropped, so only unpinned ones go, leaves first, so that no chain here is
        left with a hole. Returns the bytes freed.
        """
        if self.local.total_bytes() <= self.local_quota:
            return 0
        try:
            with self.local.lock("local-tier-quota", timeout=120):
                return self._shrink_locked()
        except StoreError as exc:  # the lock timed out: another process is at it
            log.warning("local tier %s not shrunk: %s", self.local.url, exc)
            return 0

    def _shrink_locked(self) -> int:
        now = time.time()
        segs = {s.key: s for s in self.local.segments()}
        total = sum(s.nbytes for s in segs.values())
        if total <= self.local_quota:
            return 0
        target = int(self.local_quota * _LOW_WATER)
        shared = self._try(self.remote.keys)
        if shared is _MISSING:
            shared = set()  # cannot tell: treat every copy as the only one
        pinned = pinned_keys(self.local, segs, now)
        usage = self.local.usage()
        children = dict.fromkeys(segs, 0)
        for seg in segs.values():
            if seg.parent in children:
                children[seg.parent] += 1

        def entry(key: str) -> tuple[bool, float, str]:
            use = usage.get(key)
            return (key in pinned, use.last_used if use else segs[key].created, key)

        def only_here_and_evictable(key: str) -> bool:
            return key not in shared and key not in pinned and children[key] == 0

        heap = [entry(k) for k in segs if k in shared or only_here_and_evictable(k)]
        heapq.heapify(heap)
        freed = dropped = 0
        while total > target and heap:
            _, _, key = heapq.heappop(heap)
            freed += self.local.delete(key)
            total -= segs[key].nbytes
            dropped += 1
            self._forget_local_only(key)
            parent = segs[key].parent
            if parent in children:
                children[parent] -= 1
                if only_here_and_evictable(parent):
                    heapq.heappush(heap, entry(parent))
        self.local_evicted += dropped
        self.local_evicted_bytes += freed
        log.info(
            "local tier %s over its quota of %.2f GB: dropped %d copies (%.2f GB)",
            self.local.url,
            self.local_quota / 1e9,
            dropped,
            freed / 1e9,
        )
        if total > self.local_quota:
            log.warning(
                "local tier %s is %.2f GB over its quota: what is left is pinned and held only "
                "here",
                self.local.url,
                (total - self.local_quota) / 1e9,
            )
        return freed

    def flush(self) -> None:
        """Wait until fetched segments are copied to the local tier, and it fits its quota."""
        with self._work:
            while self._pending or self._busy or self._shrink:
                self._work.wait()

    # pins and documents (written to both, so that an outage still sees them) ---------------

    def pins(self) -> list[Pin]:
        return self._read(self.remote.pins, self.local.pins)

    def set_pin(self, pin: Pin) -> None:
        """Record a pin in both tiers; a full remote refuses it (StoreFullError).

        A pin on a full store is refused rather than kept here alone: it names a prefix every
        worker is meant to share, and its segments could not be stored in the remote either.
        """
        if pin.key in self._local_only:
            raise StoreFullError(
                redact(self.remote.url),
                f"the segments of pin {pin.name!r} stayed in the local tier: the store is full",
            )
        self._try(self.remote.set_pin, pin)
        self.local.set_pin(pin)

    def delete_pin(self, root: str, name: str) -> bool:
        found = self.local.delete_pin(root, name)
        shared = self._try(self.remote.delete_pin, root, name)
        return found if shared is _MISSING else shared

    def get_doc(self, name: str) -> dict[str, Any] | None:
        return self._read(self.remote.get_doc, self.local.get_doc, name)

    def set_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Write a document to both tiers; a full remote keeps its old one (logged once there)."""
        self.local.set_doc(name, doc)
        with suppress(StoreFullError):
            self._try(self.remote.set_doc, name, doc)

    # housekeeping ---------------------------------------------------------------------------

    def generation(self) -> int:
        """The remote's generation, or the local tier's during an outage.

        Every switch between the two bumps an epoch that is added on top, so an index built
        from one tier is always rebuilt from the other when the remote goes down or comes back.
        Segments kept here while the remote is full add their own count of changes.
        """
        gen = self._read(self.remote.generation, self.local.generation)
        return self._epoch * _EPOCH_STRIDE + gen + self._changes

    def total_bytes(self) -> int:
        shared = self._try(self.remote.total_bytes)
        if shared is _MISSING:
            return self.local.total_bytes()
        return shared + sum(self._local_only.values())

    def health(self) -> StoreHealth:
        """The remote's health (see RedisStore.health); unreachable during an outage."""
        if not self.remote_up and time.monotonic() < self._retry_at:
            return StoreHealth(reachable=False, writable=False, reason="unreachable")
        return self.remote.health()

    def stats(self) -> dict[str, int]:
        """Counters since open, for metrics: the remote's, and this tier's."""
        return {
            **self.remote.stats(),
            "kept_local": self.kept_local,
            "local_only_segments": len(self._local_only),
            "write_backs_dropped": self.write_backs_dropped,
            "local_evicted": self.local_evicted,
            "local_evicted_bytes": self.local_evicted_bytes,
        }

    def lock(self, name: str, timeout: float = 600.0) -> AbstractContextManager[None]:
        return self._lock(name, timeout)

    @contextmanager
    def _lock(self, name: str, timeout: float) -> Iterator[None]:
        """The remote's lock (shared by every host), or the local one during an outage."""
        try:
            held = self._try(self._acquire, name, timeout)
        except StoreFullError:  # a server without script flags refuses even a lock when full
            held = _MISSING
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
        """gc() on both tiers, drop local copies of segments the remote no longer has, and
        shrink the local tier to its quota."""
        self.flush()
        try:
            shared = self._try(self.remote.gc)
        except StoreFullError as exc:
            log.warning("gc of the shared store stopped: %s", exc)
            shared = _MISSING
        stale = 0
        if shared is not _MISSING:
            keys = self._try(self.remote.keys)
            if keys is not _MISSING:
                for key in self.local.keys() - keys - set(self._local_only):
                    stale += self.local.delete(key)
        mine = self.local.gc()
        stale += self.shrink_local()
        if shared is _MISSING:
            return GcReport(
                orphans=mine.orphans,
                broken=mine.broken,
                expired_pins=mine.expired_pins,
                bytes_freed=mine.bytes_freed + stale,
            )
        return GcReport(
            orphans=shared.orphans + mine.orphans,
            broken=shared.broken + mine.broken,
            expired_pins=shared.expired_pins + mine.expired_pins,
            bytes_freed=shared.bytes_freed + mine.bytes_freed + stale,
        )

    def close(self) -> None:
        with self._work:
            self._closing = True
            self._work.notify_all()
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        self.local.close()
        self.remote.close()
