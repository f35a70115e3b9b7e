"""The local store: one directory, managed by diskcache.

diskcache gives process-safe SQLite metadata, file-backed values and transactions. We keep it
from ever pickling (values are bytes, keys and metadata are str), switch off its own culling
(eviction is ours: pins must survive) and make every file user-only.

Beside diskcache's table, in the same database and written in the same transactions, a table of
our own holds each segment's metadata by root with the log position of its last change (a
deleted segment leaves a tombstone for a while): :meth:`DiskStore.changes` answers an index
with what changed for its root alone (docs/design.md). A second table holds each segment's head,
so that :meth:`DiskStore.children` finds the stored continuations of a prompt in one query.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import diskcache
import diskcache.core

from ..errors import CorruptSegmentError, StoreError
from ..segment import Pin, Segment, Usage, head_key
from .base import GcReport, IndexDelta
from .docs import decode_doc, encode_doc

log = logging.getLogger(__name__)

_SEG = "seg:"
_KV = "kv:"
_USE = "use:"
_PIN = "pin:"
_DOC = "doc:"
_GEN = "generation"
_BYTES = "bytes"
#: Version of the index table; a store opened without it (older) is indexed once at open.
_INDEX_FORMAT = "index-format"
_INDEX_VERSION = 1
#: Version of the heads table (segment.head_key of each segment, for sparse lookups). A table
#: of its own, so that processes of earlier versions, which know only the index table, still
#: write to the store; what they add has no head until the next gc() (or upgrade) gives it one.
_HEADS_FORMAT = "index-heads"
_HEADS_VERSION = 1
#: Tombstones of deleted segments are kept for this many log positions: an index that last
#: looked further back than that reloads its root.
TOMBSTONE_HORIZON = 4096
_TABLE = "prefixcache_index"
_HEADS = "prefixcache_heads"
_SCHEMA = (
    # segment NULL: deleted at ``seq`` (a tombstone). The row of key '' holds the log floor.
    f"CREATE TABLE IF NOT EXISTS {_TABLE} (key TEXT PRIMARY KEY, root TEXT NOT NULL, "
    "seq INTEGER NOT NULL, segment TEXT)",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_root ON {_TABLE} (root, seq)",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_seq ON {_TABLE} (seq)",
    f"CREATE TABLE IF NOT EXISTS {_HEADS} (key TEXT PRIMARY KEY, head TEXT NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {_HEADS}_head ON {_HEADS} (head)",
)
_UPSERT = f"INSERT OR REPLACE INTO {_TABLE} (key, root, seq, segment) VALUES (?, ?, ?, ?)"
_UPSERT_HEAD = f"INSERT OR REPLACE INTO {_HEADS} (key, head) VALUES (?, ?)"
#: At most this many heads per query (SQLite's default limit on variables is 32,766).
_HEADS_PER_QUERY = 500


def _head(seg: Segment) -> str:
    return head_key(seg.parent, seg.tokens)


class SafeDisk(diskcache.Disk):
    """A diskcache Disk that stores only str/bytes/int and refuses to unpickle anything."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise StoreError(f"store keys must be str, not {type(key).__name__}")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise StoreError("refusing to unpickle a key found in the store")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not read and type(value) not in (bytes, str, int, float):
            raise StoreError(f"store values must be bytes or str, not {type(value).__name__}")
        size, mode, filename, db_value = super().store(value, read, key)
        if filename:
            os.chmod(os.path.join(self._directory, filename), stat.S_IRUSR | stat.S_IWUSR)
        return size, mode, filename, db_value

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise StoreError("refusing to unpickle a value found in the store")
        return super().fetch(mode, filename, value, read)


class _BufferReader:
    """A file-like view of a bytes-like object, read in chunks (no full copy)."""

    def __init__(self, data: Any):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        chunk = self._view[self._pos : end].tobytes()
        self._pos = end
        return chunk


class DiskStore:
    """Segments, pins and documents in one local directory."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self.url = str(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, stat.S_IRWXU)
            self._cache = diskcache.Cache(
                str(self.path),
                disk=SafeDisk,
                eviction_policy="none",
                size_limit=2**62,
                cull_limit=0,
                statistics=False,
                sqlite_synchronous=1,  # NORMAL: WAL keeps commits atomic across a crash
            )
        except (OSError, diskcache.core.Timeout) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        except Exception as exc:  # sqlite3.DatabaseError for a file that is not a database
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
            db = self.path / name
            if db.exists():
                os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)
        try:
            logged = self._cache.get(_INDEX_FORMAT) == _INDEX_VERSION
            headed = self._cache.get(_HEADS_FORMAT) == _HEADS_VERSION
            if not (logged and headed):
                for statement in _SCHEMA:
                    self._sql_retry(statement)
            if not logged:
                self._reindex()
                self._cache.set(_INDEX_FORMAT, _INDEX_VERSION)
            if not headed:
                self._add_heads()
                self._cache.set(_HEADS_FORMAT, _HEADS_VERSION)
        except (sqlite3.Error, diskcache.core.Timeout) as exc:
            raise StoreError(f"cannot index store {self.path}: {exc}") from exc

    # The index table shares diskcache's connection (one per thread) so that its rows are
    # written in the same transactions as the records they index.

    def _sql(self, statement: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._cache._sql(statement, args)

    def _sql_retry(self, statement: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._cache._sql_retry(statement, args)

    def _add_heads(self) -> None:
        """Give every live row that has none its head (at open after an upgrade, in gc)."""
        with self._cache.transact():
            rows = self._sql(
                f"SELECT key, segment FROM {_TABLE} WHERE segment IS NOT NULL "
                f"AND key NOT IN (SELECT key FROM {_HEADS})"
            ).fetchall()
            for key, text in rows:
                try:
                    seg = Segment.from_json(text)
                except CorruptSegmentError:
                    continue
                self._sql(_UPSERT_HEAD, (key, _head(seg)))

    def _reindex(self) -> None:
        """Make the index table match the segment records (at open after an upgrade, in gc)."""
        with self._cache.transact():  # one snapshot of records and rows
            records = {}
            for key in list(self._cache.iterkeys()):
                if key.startswith(_SEG):
                    text = self._cache.get(key)
                    if text is not None:
                        records[key[len(_SEG) :]] = text
            rows = {k for (k,) in self._sql(f"SELECT key FROM {_TABLE} WHERE segment IS NOT NULL")}
            missing = records.keys() - rows
            stale = rows - records.keys()
            if not missing and not stale:
                return
            gen = self._cache.incr(_GEN)
            for key in missing:
                try:
                    seg = Segment.from_json(records[key])
                except CorruptSegmentError:
                    continue
                self._sql(_UPSERT, (key, seg.root, gen, records[key]))
                self._sql(_UPSERT_HEAD, (key, _head(seg)))
            for key in stale:
                self._sql(f"UPDATE {_TABLE} SET seq = ?, segment = NULL WHERE key = ?", (gen, key))

    # segments -------------------------------------------------------------------------------

    def put(self, seg: Segment, kv: Any) -> bool:
        if _SEG + seg.key in self._cache:
            return False
        view = memoryview(kv).cast("B")
        if len(view) != seg.nbytes:
            raise StoreError(
                f"segment {seg.key[:16]}: {len(view)} bytes, metadata says {seg.nbytes}"
            )
        # Bytes first, then the metadata that makes them visible, in one transaction with the
        # size counter. A crash before the commit leaves only an orphan that gc() removes.
        # Bytes are added, never replaced: two processes storing one segment at once (their
        # bytes may differ: a one-token batch) must not leave one's checksum over the other's
        # bytes, nor pull a published file from under a reader. Whoever commits the metadata
        # first publishes the bytes under the key, its own: a writer that found another's
        # unpublished bytes there (or none left) writes its own inside the transaction.
        added = self._cache.add(_KV + seg.key, _BufferReader(view), read=True)
        with self._cache.transact():
            if _SEG + seg.key in self._cache:
                return False
            if not added or _KV + seg.key not in self._cache:
                self._cache.set(_KV + seg.key, _BufferReader(view), read=True)
            text = seg.to_json()
            self._cache.set(_SEG + seg.key, text)
            self._cache.incr(_BYTES, seg.nbytes)
            gen = self._cache.incr(_GEN)
            self._sql(_UPSERT, (seg.key, seg.root, gen, text))
            self._sql(_UPSERT_HEAD, (seg.key, _head(seg)))
        return True

    def get(self, key: str) -> Segment | None:
        text = self._cache.get(_SEG + key)
        if text is None:
            return None
        return Segment.from_json(text)

    def read_kv(self, seg: Segment, into: memoryview) -> None:
        handle = self._cache.get(_KV + seg.key, read=True)
        if handle is None:
            raise CorruptSegmentError(seg.key, "its KV bytes are missing")
        with handle:
            n = handle.readinto(into)
            extra = handle.read(1)
        if n != seg.nbytes or extra:
            raise CorruptSegmentError(seg.key, f"expected {seg.nbytes} bytes, found {n}+")

    @contextmanager
    def map_kv(self, seg: Segment) -> Iterator[memoryview | None]:
        """The segment's KV bytes mapped from their file (no copy), or None where they cannot be
        mapped (small values live in the database): then read them with :meth:`read_kv`.

        Only valid inside the block. The mapping is private (``ACCESS_COPY``): nothing written
        to the view reaches the file. diskcache writes a value's file once and replaces it by a
        new file (unlinking the old one, which a mapping survives), never in place, so the
        bytes mapped here stay those the caller checksums. The size is checked before mapping:
        a truncated file is a CorruptSegmentError, never a SIGBUS. (A file truncated in place by
        someone else while mapped would still fault, as it would for any mmap reader.)
        """
        handle = self._cache.get(_KV + seg.key, read=True)
        if handle is None:
            raise CorruptSegmentError(seg.key, "its KV bytes are missing")
        mapped = None
        with handle:
            try:
                fd = handle.fileno()
            except (OSError, io.UnsupportedOperation):  # a value kept in the database
                fd = -1
            if fd >= 0:
                size = os.fstat(fd).st_size
                if size != seg.nbytes:
                    raise CorruptSegmentError(
                        seg.key, f"expected {seg.nbytes} bytes, found {size} in its file"
                    )
                if size > 0:
                    with suppress(OSError, ValueError):  # no mmap here: read instead
                        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        if mapped is None:
            yield None
            return
        view = memoryview(mapped)
        try:
            yield view
        finally:
            # A view still exported (a traceback holding a ctypes array over it) keeps the
            # mapping until it is collected; the mapping closes itself then.
            with suppress(BufferError):
                view.release()
                mapped.close()

    def keys(self) -> set[str]:
        return {k[len(_SEG) :] for k in self._cache.iterkeys() if k.startswith(_SEG)}

    def segments(self) -> Iterator[Segment]:
        for key in list(self._cache.iterkeys()):
            if not key.startswith(_SEG):
                continue
            text = self._cache.get(key)
            if text is None:
                continue
            try:
                yield Segment.from_json(text)
            except CorruptSegmentError as exc:
                log.warning("skipping unreadable segment record %s: %s", key, exc.reason)

    def delete(self, key: str) -> int:
        with self._cache.transact():
            text = self._cache.get(_SEG + key)
            freed = 0
            if text is not None:
                try:
                    freed = Segment.from_json(text).nbytes
                except CorruptSegmentError:
                    freed = 0
                self._cache.delete(_SEG + key)
                self._cache.incr(_BYTES, -freed)
                gen = self._cache.incr(_GEN)
                self._sql(f"UPDATE {_TABLE} SET seq = ?, segment = NULL WHERE key = ?", (gen, key))
                self._sql(f"DELETE FROM {_HEADS} WHERE key = ?", (key,))
                if gen % 256 == 0:
                    self._trim_tombstones(gen - TOMBSTONE_HORIZON)
            self._cache.delete(_KV + key)
            self._cache.delete(_USE + key)
        return freed

    def _trim_tombstones(self, floor: int) -> None:
        """Drop tombstones at or below ``floor`` (in a transaction): the log starts after it."""
        if floor <= 0:
            return
        self._sql(
            f"DELETE FROM {_TABLE} WHERE segment IS NULL AND seq <= ? AND key != ''", (floor,)
        )
        self._sql(_UPSERT, ("", "", floor, None))

    def changes(self, root: str, since: int, *, limit: int | None = None) -> IndexDelta:
        """What changed among ``root``'s segments after log position ``since`` (one snapshot)."""
        over = False
        try:
            self._sql("BEGIN")  # deferred: a read snapshot, never waits for writers (WAL)
            try:
                (top,) = self._sql(f"SELECT MAX(seq) FROM {_TABLE}").fetchone()
                floor = self._sql(f"SELECT seq FROM {_TABLE} WHERE key = ''").fetchone()
                top = int(top or 0)
                full = since < 0 or since > top or (floor is not None and since < floor[0])
                if full and limit is not None:
                    (n,) = self._sql(
                        f"SELECT COUNT(*) FROM (SELECT 1 FROM {_TABLE} WHERE root = ? "
                        "AND segment IS NOT NULL LIMIT ?)",
                        (root, limit + 1),
                    ).fetchone()
                    over = n > limit
                if over:
                    rows = []
                elif full:
                    rows = self._sql(
                        f"SELECT key, segment FROM {_TABLE} WHERE root = ? AND segment IS NOT NULL",
                        (root,),
                    ).fetchall()
                else:
                    rows = self._sql(
                        f"SELECT key, segment FROM {_TABLE} WHERE root = ? AND seq > ? "
                        "ORDER BY seq",
                        (root, since),
                    ).fetchall()
            finally:
                self._sql("COMMIT")
        except (sqlite3.Error, diskcache.core.Timeout) as exc:
            raise StoreError(f"cannot read the index of store {self.path}: {exc}") from exc
        added = []
        removed = []
        for key, text in rows:
            if text is None:
                removed.append(key)
                continue
            try:
                added.append(Segment.from_json(text))
            except CorruptSegmentError as exc:
                log.warning("skipping unreadable segment record %s: %s", key[:16], exc.reason)
        return IndexDelta(seq=top, added=tuple(added), removed=tuple(removed), full=full, over=over)

    def children(self, root: str, heads: Iterable[str]) -> tuple[Segment, ...]:
        """The live segments of ``root`` with one of these heads (one indexed query)."""
        wanted = list(dict.fromkeys(heads))
        texts: list[tuple[str, str]] = []
        try:
            for i in range(0, len(wanted), _HEADS_PER_QUERY):
                batch = wanted[i : i + _HEADS_PER_QUERY]
                marks = ",".join("?" * len(batch))
                # CROSS JOIN keeps this order (heads first, by their index): the planner would
                # otherwise walk every row of the root.
                texts += self._sql(
                    f"SELECT i.key, i.segment FROM {_HEADS} h CROSS JOIN {_TABLE} i "
                    f"ON i.key = h.key WHERE h.head IN ({marks}) AND i.root = ? "
                    "AND i.segment IS NOT NULL",
                    (*batch, root),
                ).fetchall()
        except (sqlite3.Error, diskcache.core.Timeout) as exc:
            raise StoreError(f"cannot read the index of store {self.path}: {exc}") from exc
        out = []
        for key, text in texts:
            try:
                out.append(Segment.from_json(text))
            except CorruptSegmentError as exc:
                log.warning("skipping unreadable segment record %s: %s", key[:16], exc.reason)
        return tuple(out)

    def touch(self, key: str, now: float) -> None:
        try:
            use = Usage.from_json(self._cache.get(_USE + key))
            use.hits += 1
            use.last_used = now
            self._cache.set(_USE + key, use.to_json())
        except (OSError, sqlite3.Error, diskcache.core.Timeout) as exc:
            # A full disk or a locked database: bookkeeping, reported as the store's failure.
            raise StoreError(f"cannot record the use of segment {key[:16]}: {exc}") from exc

    def usage(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for key in list(self._cache.iterkeys()):
            if key.startswith(_USE):
                out[key[len(_USE) :]] = Usage.from_json(self._cache.get(key))
        return out

    # pins and documents ---------------------------------------------------------------------

    def pins(self) -> list[Pin]:
        out = []
        for key in list(self._cache.iterkeys()):
            if key.startswith(_PIN):
                text = self._cache.get(key)
                if text is not None:
                    out.append(Pin.from_json(text))
        return out

    def set_pin(self, pin: Pin) -> None:
        self._cache.set(f"{_PIN}{pin.root}:{pin.name}", pin.to_json())
        self._cache.incr(_GEN)

    def delete_pin(self, root: str, name: str) -> bool:
        found = bool(self._cache.delete(f"{_PIN}{root}:{name}"))
        if found:
            self._cache.incr(_GEN)
        return found

    def get_doc(self, name: str) -> dict[str, Any] | None:
        return decode_doc(self._cache.get(_DOC + name))

    def set_doc(self, name: str, doc: dict[str, Any]) -> None:
        self._cache.set(_DOC + name, encode_doc(doc))

    # housekeeping ---------------------------------------------------------------------------

    def generation(self) -> int:
        return int(self._cache.get(_GEN, 0))

    def total_bytes(self) -> int:
        return int(self._cache.get(_BYTES, 0))

    def lock(self, name: str, timeout: float = 600.0) -> AbstractContextManager[None]:
        return _lock(self._cache, "lock:" + name, timeout)

    def gc(self) -> GcReport:
        """Remove KV rows without metadata, files without rows, usage of segments that are gone,
        and recount the size."""
        seg_keys = set()
        kv_keys = set()
        use_keys = set()
        for key in list(self._cache.iterkeys()):
            if key.startswith(_SEG):
                seg_keys.add(key[len(_SEG) :])
            elif key.startswith(_KV):
                kv_keys.add(key[len(_KV) :])
            elif key.startswith(_USE):
                use_keys.add(key[len(_USE) :])
        # Usage of segments that are gone (a tiered store records hits of every segment it
        # restores, also of those whose local copy was skipped or dropped).
        for key in use_keys - seg_keys:
            self._cache.delete(_USE + key)
        orphans = 0
        freed = 0
        for key in kv_keys - seg_keys:
            handle = self._cache.get(_KV + key, read=True)
            if handle is not None:
                with handle:
                    freed += os.fstat(handle.fileno()).st_size if hasattr(handle, "fileno") else 0
            self._cache.delete(_KV + key)
            orphans += 1
        broken = 0
        for key in seg_keys - kv_keys:
            self.delete(key)
            broken += 1
        # Files written by a process killed before diskcache inserted their row.
        for warning in self._cache.check(fix=True):
            log.debug("gc: %s", warning.message)
        total = sum(seg.nbytes for seg in self.segments())
        self._cache.set(_BYTES, total)
        self._cache.incr(_GEN)
        self._reindex()
        self._add_heads()  # rows that writers of earlier versions added
        return GcReport(orphans=orphans, broken=broken, bytes_freed=freed)

    def close(self) -> None:
        self._cache.close()


@contextmanager
def _lock(cache: diskcache.Cache, key: str, timeout: float) -> Iterator[None]:
    """A cross-process lock: an ``add`` that only one process wins.

    A holder that died (SIGKILL, power loss) cannot release it: the lock expires after
    ``timeout``, and a holder on this host whose process is gone is replaced at once.
    """
    deadline = time.monotonic() + timeout
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
    while not cache.add(key, token, expire=timeout):
        holder = cache.get(key)
        if isinstance(holder, str) and _holder_is_dead(holder):
            with cache.transact():
                if cache.get(key) == holder:
                    cache.delete(key)
            continue
        if time.monotonic() > deadline:
            raise StoreError(f"timed out after {timeout:.0f}s waiting for store lock {key!r}")
        time.sleep(0.05)
    try:
        yield
    finally:
        with cache.transact():
            if cache.get(key) == token:
                cache.delete(key)


def _holder_is_dead(holder: str) -> bool:
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
