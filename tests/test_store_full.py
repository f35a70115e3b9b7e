"""A Redis store at maxmemory (noeviction, as docs/redis.md asks): read-only, never an error.

Real redis-server processes with a small ``maxmemory``, filled by another application's keys
until they refuse even a 64-byte write. The cache-level test (a worker restoring from a full
store) is in test_redis.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from test_redis import ROOT, RedisServer, make_segment, read, segment_records

from prefixcache import DiskStore, Pin, StoreError
from prefixcache.errors import StoreFullError
from prefixcache.lifecycle import enforce_quota
from prefixcache.status import collect
from prefixcache.store.redis import RedisStore
from prefixcache.store.tiered import TieredStore


def fill(server: RedisServer) -> int:
    """Write another application's keys until the server refuses them, and keep it full.

    A server just at its limit takes small writes again as soon as a client disconnects or
    its buffers shrink (they count); lowering maxmemory well below what is used keeps every
    write refused, as on a server that is well over (what an operator lowering maxmemory does
    too). Returns the old limit, for make_room().
    """
    client = server.client()
    n = 0
    while True:
        assert n < 100_000, "the server never filled up: is maxmemory set?"
        try:
            client.set(f"other-app:{n}", b"x" * 65536)
        except redis.exceptions.OutOfMemoryError:
            break
        n += 1
    limit = int(client.config_get("maxmemory")["maxmemory"])
    used = int(client.info("memory")["used_memory"])
    # Well below: the buffers of clients that wrote a large value are shrunk a little later.
    client.config_set("maxmemory", used - used // 4)
    client.close()
    return limit


def make_room(server: RedisServer, limit: int) -> None:
    """Undo fill(): the old limit, and the other application's keys gone."""
    client = server.client()
    client.config_set("maxmemory", limit)
    for keys in iter(lambda: client.keys("other-app:*")[:1000], []):
        client.delete(*keys)
    client.close()


@pytest.fixture
def small(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", "--maxmemory", "8mb")
    yield srv
    srv.kill()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_full_redis_store_is_read_only_and_says_so_once(
    small: RedisServer, caplog: pytest.LogCaptureFixture
):
    store = RedisStore(small.url(part_mb="0.25"))
    kept, kept_data = make_segment(ROOT, 0, [1, 2], 300_000)
    assert store.put(kept, kept_data)
    store.set_pin(Pin("p", kept.key, ROOT, 2, 1.0))
    store.set_doc("fingerprint:x", {"a": 1})
    gen = store.generation()
    assert store.health().writable
    filled = fill(small)
    caplog.clear()
    # Reads go on.
    assert store.get(kept.key) == kept and store.keys() == {kept.key}
    assert read(store, kept) == kept_data
    assert [p.name for p in store.pins()] == ["p"] and store.get_doc("fingerprint:x") == {"a": 1}
    assert store.generation() == gen
    # Usage bookkeeping is skipped and counted, never raised.
    for _ in range(3):
        store.touch(kept.key, 5.0)
    assert store.stats() == {"writes_refused": 3, "touches_skipped": 3}
    # A new segment is refused with a distinct error, and leaves nothing behind.
    new, new_data = make_segment(ROOT, 0, [3], 600_000)
    with pytest.raises(StoreFullError, match="maxmemory") as refused:
        store.put(new, new_data)
    assert isinstance(refused.value, StoreError)
    assert segment_records(small) == set(store.segment_keys(kept.key))
    with pytest.raises(StoreFullError):
        store.set_pin(Pin("q", kept.key, ROOT, 2, 1.0))
    store.set_doc("fingerprint:x", {"a": 1})  # as stored already: not written, no error
    with pytest.raises(StoreFullError):
        store.set_doc("fingerprint:x", {"a": 2})
    health = store.health()
    assert health.reachable and not health.writable and "maxmemory" in health.reason
    assert health.used_bytes is not None and health.limit_bytes is not None
    assert health.used_bytes > health.limit_bytes
    [warning] = warnings(caplog)
    assert "refuses writes" in warning and "maxmemory" in warning
    # What makes room still works on a full server: the eviction lock, unpinning, gc, deletes.
    with store.lock("evict", timeout=5):
        pass
    assert store.delete_pin(ROOT, "p") and store.pins() == []
    assert store.gc().broken == 0 and store.total_bytes() == 300_000
    assert enforce_quota(store, 0, time.time()).evicted == (kept.key,)
    assert store.keys() == set() and store.total_bytes() == 0
    assert store.generation() > gen
    # With room again, writes go through and the store says so.
    make_room(small, filled)
    assert store.put(new, new_data) and read(store, new) == new_data
    assert store.health().writable and store.refusing is None
    assert any("takes writes again" in r.getMessage() for r in caplog.records)


def test_a_tiered_store_keeps_new_segments_local_while_redis_is_full(
    small: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    remote = RedisStore(small.url(part_mb="0.25"))
    tiered = TieredStore(DiskStore(tmp_path / "tier"), remote, retry_after=0.3)
    shared, shared_data = make_segment(ROOT, 0, [1], 300_000)
    assert tiered.put(shared, shared_data)
    filled = fill(small)
    caplog.clear()
    gen = tiered.generation()
    head, head_data = make_segment(ROOT, 0, [2], 200_000)
    tail, tail_data = make_segment(head.key, 1, [3], 200_000)
    assert tiered.put(head, head_data) and tiered.put(tail, tail_data)
    # Stored here, visible to this process as if shared; the remote is unchanged.
    assert tiered.generation() == gen + 2  # one per new segment, as the cache expects
    assert tiered.keys() == {shared.key, head.key, tail.key}
    assert remote.keys() == {shared.key}
    assert tiered.get(tail.key) == tail and read(tiered, tail) == tail_data
    assert {s.key for s in tiered.segments()} == tiered.keys()
    assert tiered.total_bytes() == 700_000
    assert read(tiered, shared) == shared_data  # restores from the remote go on
    tiered.touch(shared.key, 1.0)
    tiered.touch(tail.key, 2.0)
    assert tiered.usage()[tail.key].last_used == 2.0
    assert not tiered.put(head, head_data)  # kept before: not new
    # A pin names a prefix every worker should share: refused, not kept here alone.
    with pytest.raises(StoreFullError):
        tiered.set_pin(Pin("p", tail.key, ROOT, 2, 1.0))
    with pytest.raises(StoreFullError):
        tiered.set_pin(Pin("p", shared.key, ROOT, 1, 1.0))
    tiered.set_doc("calibration:x", {"rate": 2.0})  # kept here; the remote keeps its old one
    assert tiered.remote_full and tiered.stats()["kept_local"] == 2
    status = collect(tiered)
    assert status.shared is not None and not status.shared.writable
    [note] = status.notes
    assert "full" in note and "read-only" in note
    assert [w for w in warnings(caplog) if "refuses writes" in w] == warnings(caplog)
    assert len(warnings(caplog)) == 1
    # Room again: the next put after retry_after finds it; the local-only segments drop out of
    # the view (the index is rebuilt from the remote) and new segments are shared again.
    make_room(small, filled)
    time.sleep(0.35)
    more, more_data = make_segment(tail.key, 2, [4], 1000)
    assert not tiered.put(more, more_data)  # its parent is not shared: never shared itself
    assert not tiered.remote_full and tiered.generation() != gen + 2
    assert tiered.keys() == {shared.key}
    fresh, fresh_data = make_segment(ROOT, 0, [5], 1000)
    assert tiered.put(fresh, fresh_data) and remote.get(fresh.key) == fresh
    assert collect(tiered).notes == []


def test_open_store_options_for_the_local_tier(small: RedisServer, tmp_path: Path):
    from prefixcache.store import open_store

    store = open_store(small.url(local=str(tmp_path / "t"), local_gb="0.5", write_back_mb="8"))
    assert isinstance(store, TieredStore)
    assert store.local_quota == 500_000_000 and store.write_back_bytes == 8 << 20
    default = open_store(small.url(local=str(tmp_path / "u")))
    assert isinstance(default, TieredStore) and 0 < default.local_quota <= 20e9
