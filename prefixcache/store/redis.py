"""A store shared by many workers and hosts: segments, pins and documents in Redis.

Every key of one segment shares one hash tag, so a Redis Cluster keeps them in one slot and every
multi-key step is a single-slot script::

    {prefix}:{<segment key>}:meta            hash: segment JSON, nonce, part size
    {prefix}:{<segment key>}:kv:<nonce>:<i>  KV bytes, cut in parts of ``part_bytes``

The indexes live under their own fixed tag ``{prefix}:{idx}:…`` (the set of segment keys, the
byte and generation counters, hits, last use, pins, documents, locks, and per root the change
log that indexes follow: ``rows:<root>`` maps each segment key to its JSON, ``log:<root>`` is a
sorted set of keys scored by the generation of their last change, ``dead:<root>`` the deleted
ones among them until they are trimmed, ``floor:<root>`` how far back the log still reaches;
and ``head:<head>``, the keys of the segments with that head, for sparse lookups).
A put writes its parts with a TTL under a nonce of its own, then one script checks their
lengths, makes them permanent and creates the meta record only if it does not exist yet: a
reader that sees the meta sees complete parts, concurrent writers of one key never overwrite
each other's bytes, and the parts of a write cut short expire by themselves (gc() reclaims
them sooner). Values are bytes and JSON; nothing is ever unpickled.

A server at ``maxmemory`` (with the ``noeviction`` policy that docs/redis.md asks for) refuses
every command that may grow memory. The store then behaves as a read-only one: reads work, a put
raises :class:`StoreFullError`, usage bookkeeping is skipped (logged once, counted), and the few
scripts that shrink memory or add a few bytes to what is already stored (deletes, publishing
parts already written, indexes, counters, locks) run with ``allow-oom`` so that eviction can
still make room.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ConfigError, CorruptSegmentError, StoreError, StoreFullError
from ..segment import Pin, Segment, Usage, head_key
from .base import GcReport, IndexDelta, StoreHealth
from .disk import _holder_is_dead
from .docs import decode_doc, encode_doc

log = logging.getLogger(__name__)

#: URL schemes that name a Redis server.
SCHEMES = ("redis://", "rediss://", "unix://")
#: KV bytes are written and read in parts of this size (a Redis string holds at most 512 MB).
DEFAULT_PART_BYTES = 16 << 20
#: Parts of an unpublished write expire after this long (a put takes far less).
PART_TTL_S = 3600.0
#: gc() leaves unpublished parts younger than this alone: their write may still be running.
DEFAULT_ORPHAN_GRACE_S = 300.0
DEFAULT_PREFIX = "pc"
#: Query parameters of a store URL that are ours (the rest go to redis-py).
OUR_PARAMS = (
    "prefix",
    "local",
    "cluster",
    "part_mb",
    "retry_after",
    "local_gb",
    "write_back_mb",
)
#: Fail fast when the server is gone (a TieredStore then falls back to its local tier): short
#: connect timeout, and one immediate retry (for a pooled connection the server has closed)
#: instead of redis-py's default backoff of several seconds. Timeouts in the URL win.
_TIMEOUTS = {"socket_connect_timeout": 2.0, "socket_timeout": 30.0}

#: Errors that mean "the server cannot be reached", as opposed to a refused command.
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
)

#: Tombstones of deleted segments stay in a root's change log for this many log positions: an
#: index that last looked further back than that reloads the root.
TOMBSTONE_HORIZON = 4096
#: Version of the change log's layout, in ``{prefix}:{idx}:index-format``.
_INDEX_VERSION = b"1"
#: Version of the head sets (``head:<head>``: the keys of the segments with that head, for
#: sparse lookups), in ``{prefix}:{idx}:heads-format``. A marker of its own, so that processes
#: of earlier versions still write to the store; what they add has no head set until the next
#: gc() gives it one.
_HEADS_VERSION = b"1"
#: Log positions below the dataset id (see RedisStore.generation).
_SEQ_MASK = (1 << 48) - 1

#: Scripts that must run on a full server start with this line (Redis 7 script flags).
_ALLOW_OOM = "#!lua flags=allow-oom\n"

T = TypeVar("T")


class StoreUnavailableError(StoreError):
    """The Redis server cannot be reached (down, restarting, or the network is)."""


# Publish one segment: parts complete -> persist them -> create the meta (only if absent).
# KEYS: meta, part 0..n-1; ARGV: segment JSON, nonce, part bytes, total bytes.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local pb = tonumber(ARGV[3])
local total = tonumber(ARGV[4])
for i = 2, #KEYS do
  if redis.call('STRLEN', KEYS[i]) ~= math.min(pb, total - (i - 2) * pb) then return -1 end
end
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('HSET', KEYS[1], 'segment', ARGV[1], 'nonce', ARGV[2], 'part_bytes', ARGV[3])
return 1
"""

# Remove one segment's meta and parts if the meta still has the nonce the caller read.
# KEYS: meta, part 0..n-1; ARGV: nonce.
_UNPUBLISH = """
if redis.call('HGET', KEYS[1], 'nonce') ~= ARGV[1] then return 0 end
redis.call('DEL', unpack(KEYS))
return 1
"""

# KEYS: segments set, bytes, generation, rows, log, dead, roots, head; ARGV: segment key,
# nbytes, segment JSON, root.
_INDEX_ADD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCRBY', KEYS[2], ARGV[2])
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[4])
redis.call('SADD', KEYS[8], ARGV[1])
return 1
"""

# Log a segment whose meta is published but that the root's rows lack (an upgraded store, or a
# writer that died before indexing it): KEYS: segments set, generation, rows, log, dead, roots,
# head; ARGV: segment key, segment JSON, root.
_REINDEX = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('SADD', KEYS[7], ARGV[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[3])
return 1
"""

# Tombstone a key in a root's log at position ``seq``, and now and then trim tombstones older than
# ``horizon`` log positions. k: rows, log, dead, floor[, head]; ARGV[1]: segment key.
_UNLOG = """
local function unlog(k, seq, horizon)
  redis.call('HDEL', k[1], ARGV[1])
  if k[5] then redis.call('SREM', k[5], ARGV[1]) end
  redis.call('ZADD', k[2], seq, ARGV[1])
  redis.call('ZADD', k[3], seq, ARGV[1])
  if seq % 256 == 0 then
    local floor = seq - horizon
    local old = redis.call('ZRANGEBYSCORE', k[3], '-inf', floor)
    for i = 1, #old do
      redis.call('ZREM', k[2], old[i])
      redis.call('ZREM', k[3], old[i])
    end
    if floor > tonumber(redis.call('GET', k[4]) or '0') then redis.call('SET', k[4], floor) end
  end
end
"""

# KEYS: segments set, bytes, generation, hits, last use [, rows, log, dead, floor, head];
# ARGV: segment key, nbytes, horizon.
_INDEX_REMOVE = (
    _UNLOG
    + """
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DECRBY', KEYS[2], ARGV[2])
local seq = redis.call('INCR', KEYS[3])
if #KEYS > 5 then unlog({KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]}, seq, tonumber(ARGV[3])) end
return 1
"""
)

# KEYS: generation, rows, log, dead, floor[, head]; ARGV: segment key, horizon.
_UNINDEX = (
    _UNLOG
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
unlog({KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, redis.call('INCR', KEYS[1]), tonumber(ARGV[2]))
return 1
"""
)

# Read-only. What changed in a root after log position ARGV[1], or (-1, or a position the log
# no longer reaches) its full listing, unless the root holds more than ARGV[2] (>= 0) segments.
# KEYS: log, rows, floor, dataset.
# Returns {full, top, dataset, {key, JSON or '' (deleted), ...}, over}.
_CHANGES = """
local since = tonumber(ARGV[1])
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or '0'
local dataset = redis.call('GET', KEYS[4]) or ''
if since < 0 or since < floor or since > tonumber(top) then
  local limit = tonumber(ARGV[2])
  if limit >= 0 and redis.call('HLEN', KEYS[2]) > limit then return {1, top, dataset, {}, 1} end
  return {1, top, dataset, redis.call('HGETALL', KEYS[2]), 0}
end
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGET', KEYS[2], key) or ''
end
return {0, top, dataset, out, 0}
"""

# Read-only. The rows of a root's segments in the given head sets. KEYS: rows, head sets.
# Returns {key, JSON, ...}.
_CHILDREN = """
local out = {}
for i = 2, #KEYS do
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    local row = redis.call('HGET', KEYS[1], key)
    if row then
      out[#out + 1] = key
      out[#out + 1] = row
    end
  end
end
return out
"""

# KEYS: head sets; ARGV: a segment key for each.
_ADD_HEADS = """
for i = 1, #KEYS do redis.call('SADD', KEYS[i], ARGV[i]) end
return 1
"""

# KEYS: key; ARGV: value.
_SET = """
return redis.call('SET', KEYS[1], ARGV[1])
"""

# KEYS: pins, generation; ARGV: pin field.
_UNPIN = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
"""

# KEYS: lock; ARGV: token, milliseconds.
_ACQUIRE = """
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""

# KEYS: key; ARGV: value. (The dataset id: created once, on a full server too.)
_SET_NX = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# KEYS: bytes, generation; ARGV: recounted bytes.
_RECOUNT = """
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('INCR', KEYS[2])
"""

# KEYS: lock; ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _refusal(exc: redis.exceptions.ResponseError) -> str | None:
    """Why the server refused a write while it still serves reads, or None for other errors.

    Full at maxmemory (OOM), unable to persist (MISCONF: its disk is full, say) or a read-only
    replica. redis-py strips the error code from the message; it is put back, and the
    pipeline's "Command # 1 (...) caused error:" and a script's "script: <sha>" are dropped.
    """
    text = str(exc).rpartition("caused error: ")[2].split(". script:", 1)[0]
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return text if text.startswith("OOM") else f"OOM {text}"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return text if text.startswith("READONLY") else f"READONLY {text}"
    if text.startswith("MISCONF"):
        return text
    return None


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a store URL into the URL redis-py gets and our own options (prefix, local, …)."""
    if not url.startswith(SCHEMES):
        raise ConfigError(f"not a redis URL: {url!r} (expected redis://, rediss:// or unix://)")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"malformed redis URL {redact(url)}: {exc}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"malformed redis URL {redact(url)}: no host")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"malformed redis URL {redact(url)}: no socket path")
    ours: dict[str, str] = {}
    rest = []
    for name, value in query:
        if name in OUR_PARAMS:
            if name in ours:
                raise ConfigError(f"redis URL {redact(url)} gives {name!r} twice")
            ours[name] = value
        else:
            rest.append((name, value))
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    return plain, ours


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


class RedisStore:
    """Segments, pins and documents in one Redis database (or Cluster), shared by all workers.

    Args:
        url: ``redis://[user:pass@]host:port/db``, ``rediss://…`` or ``unix:///path.sock``, with
            optional query parameters ``prefix`` (key namespace, default ``pc``), ``cluster``
            (``1`` for Redis Cluster), ``part_mb`` (part size) and redis-py's own options
            (``socket_timeout``, …). ``local`` is read by :func:`open_store`, ignored here.
        orphan_grace: seconds gc() leaves unpublished parts alone (their write may be running).

    Nothing is sent to the server until the first call. A server that cannot be reached raises
    :class:`StoreUnavailableError`; one that refuses writes (full at ``maxmemory``, read-only)
    raises :class:`StoreFullError` from a write; any other Redis error raises
    :class:`StoreError`.
    """

    def __init__(self, url: str, *, orphan_grace: float = DEFAULT_ORPHAN_GRACE_S):
        self.url = url
        plain, ours = split_url(url)
        self.prefix = ours.get("prefix", DEFAULT_PREFIX)
        if not self.prefix or any(c in self.prefix for c in "{}*?[]\\ "):
            raise ConfigError(
                f"redis URL {redact(url)}: prefix {self.prefix!r} must be non-empty, without "
                "braces, glob characters or spaces"
            )
        try:
            self.part_bytes = int(float(ours.get("part_mb", DEFAULT_PART_BYTES / 2**20)) * 2**20)
        except ValueError:
            raise ConfigError(f"redis URL {redact(url)}: part_mb must be a number") from None
        if not 1 <= self.part_bytes <= 512 << 20:
            raise ConfigError(f"redis URL {redact(url)}: part_mb must be between 1 B and 512 MB")
        self.cluster = ours.get("cluster", "0").lower() in ("1", "true", "yes")
        self.orphan_grace = orphan_grace
        # Timeouts in the URL override these defaults (redis-py lets URL options win).
        cls: Any = redis.RedisCluster if self.cluster else redis.Redis
        self._factory: Callable[[], Any] = lambda: cls.from_url(
            plain, retry=Retry(NoBackoff(), 1), **_TIMEOUTS
        )
        self._client: Any = None
        try:
            if not self.cluster:  # RedisCluster connects in its constructor: wait for first use
                self._client = self._factory()
        except ValueError as exc:
            raise ConfigError(f"malformed redis URL {redact(url)}: {exc}") from None
        idx = f"{self.prefix}:{{idx}}:"
        self._segs = idx + "segments"
        self._bytes = idx + "bytes"
        self._gen = idx + "generation"
        self._dataset = idx + "dataset"
        self._hits = idx + "hits"
        self._last = idx + "last_used"
        self._pins = idx + "pins"
        self._docs = idx + "docs"
        self._locks = idx + "lock:"
        self._roots = idx + "roots"
        self._format = idx + "index-format"
        self._heads_format = idx + "heads-format"
        self._indexed = False  # whether this store's change log is known to be complete
        # KEYS of the index scripts.
        self._index_keys = [self._segs, self._bytes, self._gen, self._hits, self._last]
        self._scripts: dict[str, Any] = {}
        self._flags_ok = True  # False on a server older than Redis 7 (no script flags)
        # Why the server refused the last write, until a write succeeds again (None: it takes
        # writes, as far as we know); and counters for stats and metrics.
        self.refusing: str | None = None
        self.touches_skipped = 0
        self.writes_refused = 0

    def __repr__(self) -> str:
        return f"RedisStore({redact(self.url)!r})"

    # plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The redis-py client (created on first use)."""
        if self._client is None:
            self._client = self._call(self._factory)
        return self._client

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` translating redis-py errors into ours."""
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.AuthenticationError as exc:
            # A ConnectionError to redis-py, but a setting to fix, not an outage to ride out.
            raise StoreError(f"redis at {redact(self.url)} refused the credentials: {exc}") from exc
        except UNREACHABLE as exc:
            raise StoreUnavailableError(
                f"redis at {redact(self.url)} is unreachable: {exc}"
            ) from exc
        except redis.exceptions.ResponseError as exc:
            refusal = _refusal(exc)
            if refusal is not None:
                self._refused(refusal)
                raise StoreFullError(redact(self.url), refusal) from exc
            raise StoreError(f"redis at {redact(self.url)}: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"redis at {redact(self.url)}: {exc}") from exc

    def _refused(self, reason: str) -> None:
        """Note that the server refused a write; say so once until it takes writes again."""
        self.writes_refused += 1
        if self.refusing is None:
            log.warning(
                "shared store %s refuses writes (%s): it is read-only until room is made. "
                "Restores go on; hits are not recorded, new segments are not shared (a tiered "
                "store keeps them on this host) and pinning fails. Lower quota_gb so that "
                "eviction frees space, remove prefixes, or raise maxmemory (docs/redis.md)",
                redact(self.url),
                reason,
            )
        self.refusing = reason

    def _wrote(self) -> None:
        """A write went through: the server has room (again)."""
        if self.refusing is not None:
            self.refusing = None
            log.info("shared store %s takes writes again", redact(self.url))

    def _run(
        self, source: str, keys: list[str], args: list[Any], *, allow_oom: bool = False
    ) -> Any:
        """Run a Lua script (EVALSHA, loading it again after a server restart).

        ``allow_oom`` lets it run on a server at maxmemory: only for scripts that free memory or
        add a few bytes to records of data already written. Before Redis 7 (no script flags)
        such a script runs plain, and refuses like any other write on a full server.
        """
        if allow_oom and self._flags_ok:
            try:
                return self._script(_ALLOW_OOM + source, keys, args)
            except StoreError as exc:
                if "shebang" not in str(exc) and "compiling" not in str(exc):
                    raise
                log.debug("redis at %s has no script flags: %s", redact(self.url), exc)
                self._flags_ok = False
        return self._script(source, keys, args)

    def _script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return self._call(script, keys=keys, args=args)

    def _meta(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:meta"

    def _part(self, key: str, nonce: str, i: int) -> str:
        return f"{self.prefix}:{{{key}}}:kv:{nonce}:{i}"

    def part_names(self, key: str, nonce: str, nbytes: int, part_bytes: int = 0) -> list[str]:
        """Names of the KV parts of one write of segment ``key`` (``nonce`` names the write)."""
        part_bytes = part_bytes or self.part_bytes
        return [self._part(key, nonce, i) for i in range(max(1, math.ceil(nbytes / part_bytes)))]

    def segment_keys(self, key: str) -> list[str]:
        """Every Redis key that holds the stored segment ``key`` now (its meta and parts)."""

        def run() -> list[str]:
            nonce, part_bytes, text = self.client.hmget(
                self._meta(key), "nonce", "part_bytes", "segment"
            )
            if nonce is None:
                return []
            seg = Segment.from_json(text)
            return [
                self._meta(key),
                *self.part_names(key, nonce.decode(), seg.nbytes, int(part_bytes)),
            ]

        return self._call(run)

    def ping(self) -> None:
        self._call(self.client.ping)

    def health(self) -> StoreHealth:
        """Reachability and room, from ``INFO memory`` (read-only: it works on a full server).

        Writable is False when the memory Redis counts against ``maxmemory`` is within one part
        (at most 1% of it) of the limit, on any node: a part that size would be refused, and a
        server just under the limit is pushed over it again by its own clients' buffers. It is
        also False after a refusal that memory does not explain (MISCONF, READONLY) until a
        write goes through again.
        """
        try:
            info = self._call(lambda: self.client.info("memory"))
        except StoreUnavailableError as exc:
            return StoreHealth(reachable=False, writable=False, reason=str(exc.__cause__ or exc))
        nodes = list(info.values()) if info and isinstance(next(iter(info.values())), dict) else []
        used = limit = 0
        full = False
        for node in nodes or [info]:
            n_used = int(node.get("used_memory", 0)) - int(node.get("mem_not_counted_for_evict", 0))
            n_limit = int(node.get("maxmemory", 0))
            used += n_used
            limit += n_limit
            margin = min(self.part_bytes, n_limit // 100)
            full = full or (n_limit > 0 and n_used >= n_limit - margin)
        stuck = self.refusing is not None and not self.refusing.startswith("OOM")
        return StoreHealth(
            reachable=True,
            writable=not (full or stuck),
            reason=(self.refusing or "") if full or stuck else "",
            used_bytes=used,
            limit_bytes=limit or None,
        )

    def stats(self) -> dict[str, int]:
        """Counters since open: writes the server refused, usage updates skipped because of it."""
        return {"writes_refused": self.writes_refused, "touches_skipped": self.touches_skipped}

    # segments -------------------------------------------------------------------------------

    def put(self, seg: Segment, kv: Any) -> bool:
        view = memoryview(kv).cast("B")
        if len(view) != seg.nbytes:
            raise StoreError(
                f"segment {seg.key[:16]}: {len(view)} bytes, metadata says {seg.nbytes}"
            )
        meta = self._meta(seg.key)
        # Parts that vanish before publishing mean the server restarted (empty) or was flushed
        # meanwhile: write them once more to the server as it is now.
        for _ in range(2):
            if self._call(lambda: self.client.exists(meta)):
                return False
            nonce = uuid.uuid4().hex[:16]
            parts = self.part_names(seg.key, nonce, seg.nbytes, self.part_bytes)
            try:
                self.write_parts(parts, view)
                # Publishing adds only the meta to parts already written: allowed when full.
                published = self._run(
                    _PUBLISH,
                    [meta, *parts],
                    [seg.to_json(), nonce, self.part_bytes, seg.nbytes],
                    allow_oom=True,
                )
            except StoreError:
                # Refused (full) or cut off: drop what was written (deleting needs no room; an
                # unreachable server lets the parts expire by themselves).
                with suppress(StoreError):
                    self._call(lambda parts=parts: self.client.delete(*parts))
                raise
            if published == 1:
                self._index_add(seg)
                self._wrote()
                return True
            self._call(lambda parts=parts: self.client.delete(*parts))
            if published == 0:
                return False  # another writer published it first
            log.info("segment %s: parts vanished before publishing; writing again", seg.key[:16])
        raise StoreError(f"segment {seg.key[:16]}: its parts vanished before publishing, twice")

    def write_parts(self, parts: list[str], view: memoryview) -> None:
        """Write unpublished parts (each expires unless a publish makes it permanent)."""
        ttl = int(PART_TTL_S * 1000)
        for i, name in enumerate(parts):
            chunk = view[i * self.part_bytes : (i + 1) * self.part_bytes]
            # redis-py sends a memoryview as is, without copying it into the command buffer.
            self._call(self.client.set, name, chunk, px=ttl)

    def get(self, key: str) -> Segment | None:
        text = self._call(lambda: self.client.hget(self._meta(key), "segment"))
        return None if text is None else Segment.from_json(text)

    def read_kv(self, seg: Segment, into: memoryview) -> None:
        nonce, part_bytes = self._call(
            lambda: self.client.hmget(self._meta(seg.key), "nonce", "part_bytes")
        )
        if nonce is None or part_bytes is None:
            raise CorruptSegmentError(seg.key, "its KV bytes are missing")
        size = int(part_bytes)
        out = into.cast("B") if into.format != "B" else into
        if len(out) < seg.nbytes:
            raise StoreError(f"segment {seg.key[:16]}: buffer of {len(out)} < {seg.nbytes} bytes")
        for i, name in enumerate(self.part_names(seg.key, nonce.decode(), seg.nbytes, size)):
            start = i * size
            want = min(size, seg.nbytes - start)
            data = self._call(self.client.get, name)
            if data is None or len(data) != want:
                found = "none" if data is None else len(data)
                raise CorruptSegmentError(
                    seg.key, f"KV part {i} has {found} bytes, expected {want}"
                )
            out[start : start + want] = data

    def keys(self) -> set[str]:
        return {k.decode() for k in self._call(lambda: self.client.smembers(self._segs))}

    def segments(self) -> Iterator[Segment]:
        keys = sorted(self.keys())
        for i in range(0, len(keys), 256):
            batch = keys[i : i + 256]

            def fetch(batch: list[str] = batch) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for key in batch:
                    pipe.hget(self._meta(key), "segment")
                return list(pipe.execute())

            for key, text in zip(batch, self._call(fetch), strict=True):
                if text is None:
                    continue  # deleted since the listing
                try:
                    yield Segment.from_json(text)
                except CorruptSegmentError as exc:
                    log.warning("skipping unreadable segment record %s: %s", key, exc.reason)

    def delete(self, key: str) -> int:
        meta = self._meta(key)
        nonce, part_bytes, text = self._call(
            lambda: self.client.hmget(meta, "nonce", "part_bytes", "segment")
        )
        if nonce is None:
            return 0
        try:
            nbytes = Segment.from_json(text).nbytes
            parts = self.part_names(key, nonce.decode(), nbytes, int(part_bytes))
        except (CorruptSegmentError, TypeError, ValueError):
            nbytes, parts = 0, []  # unreadable meta: gc() reclaims the parts it leaves
        done = self._run(_UNPUBLISH, [meta, *parts], [nonce], allow_oom=True)
        if done != 1:
            return 0  # deleted (or replaced) by someone else meanwhile
        old = None
        with suppress(CorruptSegmentError, TypeError):
            old = Segment.from_json(text)
        logs = [] if old is None else [*self._log_keys(old.root)[1:], self._head_set(old)]
        self._run(
            _INDEX_REMOVE,
            [*self._index_keys, *logs],
            [key, nbytes, TOMBSTONE_HORIZON],
            allow_oom=True,
        )
        return nbytes

    def touch(self, key: str, now: float) -> None:
        """Count a hit; skipped (logged once, counted) while the server refuses writes.

        Usage only orders eviction: losing some of it on a full server is better than failing
        the restore that it records.
        """

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.hincrby(self._hits, key, 1)
            pipe.hset(self._last, key, repr(now))
            pipe.execute()

        try:
            self._call(run)
        except StoreFullError:
            self.touches_skipped += 1
            return
        self._wrote()

    def usage(self) -> dict[str, Usage]:
        def run() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self._hits)
            pipe.hgetall(self._last)
            hits, last = pipe.execute()
            return hits, last

        hits, last = self._call(run)
        out: dict[str, Usage] = {}
        for k in hits.keys() | last.keys():
            try:
                out[k.decode()] = Usage(int(hits.get(k, 0)), float(last.get(k, 0.0)))
            except ValueError:
                out[k.decode()] = Usage()
        return out

    # pins and documents ---------------------------------------------------------------------

    def pins(self) -> list[Pin]:
        out = []
        for field, text in self._call(lambda: self.client.hgetall(self._pins)).items():
            try:
                out.append(Pin.from_json(text))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable pin record %s: %s", field, exc)
        return out

    def set_pin(self, pin: Pin) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self._pins, f"{pin.root}:{pin.name}", pin.to_json())
            pipe.incr(self._gen)
            pipe.execute()

        self._call(run)
        self._wrote()

    def delete_pin(self, root: str, name: str) -> bool:
        # One script, so that the generation moves with the record even on a full server.
        return bool(self._run(_UNPIN, [self._pins, self._gen], [f"{root}:{name}"], allow_oom=True))

    def get_doc(self, name: str) -> dict[str, Any] | None:
        return decode_doc(self._call(lambda: self.client.hget(self._docs, name)))

    def set_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Store a document; one that is already stored as is is not written again.

        (Every cache writes its model's fingerprint record when it opens: on a full server
        that must not fail when the record is there already.)
        """
        text = encode_doc(doc)
        if self._call(lambda: self.client.hget(self._docs, name)) == text.encode():
            return
        self._call(lambda: self.client.hset(self._docs, name, text))
        self._wrote()

    # housekeeping ---------------------------------------------------------------------------

    def generation(self) -> int:
        """The generation counter, tagged with the id of this dataset.

        A server that restarted empty (or was flushed) counts from zero again; the id, created
        with the first call after that, makes sure the value still differs from every value
        seen before, so that every cache rebuilds its index.
        """

        def run() -> tuple[bytes | None, bytes]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self._gen)
            pipe.get(self._dataset)
            gen, dataset = pipe.execute()
            return gen, dataset

        gen, dataset = self._call(run)
        if dataset is None:
            dataset = self._run(_SET_NX, [self._dataset], [uuid.uuid4().hex], allow_oom=True)
        dataset = dataset or b""
        return (zlib.crc32(dataset) << 48) + int(gen or 0)

    def total_bytes(self) -> int:
        return int(self._call(lambda: self.client.get(self._bytes)) or 0)

    def lock(self, name: str, timeout: float = 600.0) -> AbstractContextManager[None]:
        return self._lock(self._locks + name, timeout)

    @contextmanager
    def _lock(self, key: str, timeout: float) -> Iterator[None]:
        """SET NX PX with a token; released only by its holder (compare-and-delete).

        A holder that died cannot release it: the lock expires after ``timeout``, and a holder
        on this host whose process is gone is replaced at once.
        """
        deadline = time.monotonic() + timeout
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        px = max(1, int(timeout * 1000))
        # allow-oom: the eviction lock must be taken on a full server, to make room.
        while not self._run(_ACQUIRE, [key], [token, px], allow_oom=True):
            holder = self._call(lambda: self.client.get(key))
            if holder is not None and _holder_is_dead(holder.decode(errors="replace")):
                self._run(_RELEASE, [key], [holder])
                continue
            if time.monotonic() > deadline:
                raise StoreError(f"timed out after {timeout:.0f}s waiting for store lock {key!r}")
            time.sleep(0.05)
        try:
            yield
        finally:
            self._run(_RELEASE, [key], [token])

    def gc(self) -> GcReport:
        """Index what a crash left unindexed, drop broken metas and stale parts, recount bytes.

        Parts without a meta are removed once they are older than ``orphan_grace`` (younger
        ones may belong to a write still running); permanent parts without a meta go at once.
        """
        broken = 0
        indexed = self.keys()
        found: dict[str, tuple[str, Segment]] = {}
        for key in self._scan_keys(f"{self.prefix}:{{*}}:meta"):
            seg_key = key[len(self.prefix) + 2 : -len("}:meta")]
            meta = self._meta(seg_key)
            nonce, part_bytes, text = self._call(
                self.client.hmget, meta, "nonce", "part_bytes", "segment"
            )
            try:
                seg = Segment.from_json(text)
                if seg.key != seg_key or nonce is None or part_bytes is None:
                    raise CorruptSegmentError(seg_key, "meta does not match its key")
                parts = self.part_names(seg_key, nonce.decode(), seg.nbytes, int(part_bytes))
                lengths = self._strlens(parts)
                sizes = [
                    min(int(part_bytes), seg.nbytes - i * int(part_bytes))
                    for i in range(len(parts))
                ]
                if lengths != sizes:
                    raise CorruptSegmentError(seg_key, "KV parts are missing or short")
            except (CorruptSegmentError, TypeError, ValueError) as exc:
                log.warning("gc: removing broken segment %s: %s", seg_key[:16], exc)
                # Only the meta read above (a concurrent re-put has another nonce); its parts,
                # now named by no meta, are reclaimed below.
                if nonce is None:
                    self._call(self.client.delete, meta)
                else:
                    self._run(_UNPUBLISH, [meta], [nonce], allow_oom=True)
                self._run(
                    _INDEX_REMOVE, self._index_keys, [seg_key, 0, TOMBSTONE_HORIZON], allow_oom=True
                )
                broken += 1
                continue
            found[seg_key] = (nonce.decode(), seg)
            if seg_key not in indexed:
                # Published by a writer that died before indexing it.
                self._index_add(seg)
        for stale in indexed - found.keys():
            self._call(self.client.srem, self._segs, stale)
        self._reindex({k: s for k, (_, s) in found.items()})
        orphans, freed = self._reclaim_parts(found)
        total = sum(s.nbytes for _, s in found.values())
        self._run(_RECOUNT, [self._bytes, self._gen], [total], allow_oom=True)
        return GcReport(orphans=orphans, broken=broken, bytes_freed=freed)

    def _reclaim_parts(self, found: dict[str, tuple[str, Segment]]) -> tuple[int, int]:
        """Delete parts that no meta names and that are past their grace period."""
        orphans: set[tuple[str, str]] = set()
        freed = 0
        young_ms = (PART_TTL_S - self.orphan_grace) * 1000
        for name in self._scan_keys(f"{self.prefix}:{{*}}:kv:*"):
            head, _, rest = name[len(self.prefix) + 2 :].partition("}:kv:")
            nonce = rest.partition(":")[0]
            if found.get(head, ("",))[0] == nonce:
                continue
            # Re-read the meta: a write may have been published since the scan began.
            current = self._call(self.client.hget, self._meta(head), "nonce")
            if current is not None and current.decode() == nonce:
                continue
            ttl = self._call(self.client.pttl, name)
            if ttl == -2 or (ttl >= 0 and ttl > young_ms):
                continue  # gone already, or young: its write may be running
            size = self._call(self.client.strlen, name)
            if self._call(self.client.delete, name):
                freed += int(size)
                orphans.add((head, nonce))
        return len(orphans), freed

    # the change log (see the module docstring and docs/design.md) ---------------------------

    def _log_keys(self, root: str) -> list[str]:
        """generation, rows, log, dead and floor of one root (all in the index's slot)."""
        idx = f"{self.prefix}:{{idx}}:"
        return [self._gen, *(f"{idx}{what}:{root}" for what in ("rows", "log", "dead", "floor"))]

    def _head_set(self, seg: Segment) -> str:
        """The set of the segments that share ``seg``'s head (segment.head_key)."""
        return self._heads_key(head_key(seg.parent, seg.tokens))

    def _heads_key(self, head: str) -> str:
        return f"{self.prefix}:{{idx}}:head:{head}"

    def _index_add(self, seg: Segment) -> None:
        self._ensure_indexed()  # the first write to a new store marks its log complete
        _, rows, log_, dead, _ = self._log_keys(seg.root)
        keys = [self._segs, self._bytes, self._gen, rows, log_, dead, self._roots]
        keys.append(self._head_set(seg))
        self._run(_INDEX_ADD, keys, [seg.key, seg.nbytes, seg.to_json(), seg.root], allow_oom=True)

    def _reindex(self, segments: dict[str, Segment]) -> None:
        """Make every root's rows match ``segments`` (every published segment)."""
        roots = {r.decode() for r in self._call(lambda: self.client.smembers(self._roots))}
        roots.update(s.root for s in segments.values())
        for root in roots:
            gen, rows, log_, dead, floor = self._log_keys(root)
            listed = self._call(lambda rows=rows: self.client.hgetall(rows))
            have = {k.decode(): v for k, v in listed.items()}
            for key in have.keys() - segments.keys():
                heads = []
                with suppress(CorruptSegmentError):
                    heads = [self._head_set(Segment.from_json(have[key]))]
                self._run(
                    _UNINDEX,
                    [gen, rows, log_, dead, floor, *heads],
                    [key, TOMBSTONE_HORIZON],
                    allow_oom=True,
                )
            for key, seg in segments.items():
                if seg.root == root and key not in have:
                    self._run(
                        _REINDEX,
                        [self._segs, gen, rows, log_, dead, self._roots, self._head_set(seg)],
                        [key, seg.to_json(), root],
                        allow_oom=True,
                    )
        # Head sets of segments logged by writers of earlier versions (they keep none).
        listed = list(segments.values())
        for i in range(0, len(listed), 512):
            batch = listed[i : i + 512]
            heads = [self._head_set(seg) for seg in batch]
            self._run(_ADD_HEADS, heads, [seg.key for seg in batch], allow_oom=True)

    def _ensure_indexed(self) -> None:
        """Log the segments of a store written before the change log (or its head sets)
        existed (once)."""
        if self._indexed:
            return

        def current() -> bool:
            marks = self._call(lambda: self.client.mget(self._format, self._heads_format))
            return list(marks) == [_INDEX_VERSION, _HEADS_VERSION]

        if not current():
            with self.lock("index-upgrade", timeout=600):
                if not current():
                    self._reindex({s.key: s for s in self.segments()})
                    self._run(_SET_NX, [self._format], [_INDEX_VERSION], allow_oom=True)
                    self._run(_SET, [self._heads_format], [_HEADS_VERSION], allow_oom=True)
        self._indexed = True

    def changes(self, root: str, since: int, *, limit: int | None = None) -> IndexDelta:
        """What changed among ``root``'s segments after ``since``: one read-only script.

        Positions carry the dataset id (as :meth:`generation` does), so a server that
        started over empty answers with the full listing.
        """
        self._ensure_indexed()
        _, rows, log_, _, floor = self._log_keys(root)
        keys = [log_, rows, floor, self._dataset]
        raw = since & _SEQ_MASK if since >= 0 else -1
        most = -1 if limit is None else limit
        full, top, dataset, flat, over = self._run(_CHANGES, keys, [raw, most])
        if not dataset:  # a server that started (over) empty: name this dataset now
            dataset = self._run(_SET_NX, [self._dataset], [uuid.uuid4().hex], allow_oom=True)
        tag = zlib.crc32(dataset or b"") << 48
        if since >= 0 and since & ~_SEQ_MASK != tag and not full:
            full, top, _, flat, over = self._run(_CHANGES, keys, [-1, most])
        added = []
        removed = []
        for key, text in zip(flat[::2], flat[1::2], strict=True):
            if not text:
                removed.append(key.decode())
                continue
            try:
                added.append(Segment.from_json(text))
            except CorruptSegmentError as exc:
                log.warning("skipping unreadable segment record %s: %s", key[:16], exc.reason)
        if full:
            added.sort(key=lambda s: s.start)
        return IndexDelta(
            seq=tag + int(top),
            added=tuple(added),
            removed=tuple(removed),
            full=bool(full),
            over=bool(over),
        )

    def children(self, root: str, heads: Iterable[str]) -> tuple[Segment, ...]:
        """The segments of ``root`` with one of these heads: one read-only script."""
        self._ensure_indexed()
        sets = [self._heads_key(h) for h in dict.fromkeys(heads)]
        if not sets:
            return ()
        rows = self._log_keys(root)[1]
        flat = self._run(_CHILDREN, [rows, *sets], [])
        out = []
        for key, text in zip(flat[::2], flat[1::2], strict=True):
            try:
                out.append(Segment.from_json(text))
            except CorruptSegmentError as exc:
                log.warning("skipping unreadable segment record %s: %s", key[:16], exc.reason)
        return tuple(out)

    def _strlens(self, names: list[str]) -> list[int]:
        def run() -> list[int]:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.strlen(name)
            return [int(n) for n in pipe.execute()]

        return self._call(run)

    def _scan_keys(self, pattern: str) -> list[str]:
        return [
            k.decode()
            for k in self._call(lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        ]

    def close(self) -> None:
        if self._client is not None:
            with suppress(redis.exceptions.RedisError):
                self._client.close()
