"""The tiered store's local tier under pressure, on real redis-server processes.

Its own quota (least recently used copies go; what only it holds goes only if unpinned), a
bound in bytes on the copies that wait for it, and a Redis server killed and restarted while
several threads use the store.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_redis import ROOT, RedisServer, make_segment, read

from prefixcache import CorruptSegmentError, DiskStore, Pin
from prefixcache.store.redis import RedisStore, StoreUnavailableError
from prefixcache.store.tiered import TieredStore


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis")
    yield srv
    srv.kill()


def tiered_store(server: RedisServer, tier: Path, **options: Any) -> TieredStore:
    return TieredStore(DiskStore(tier), RedisStore(server.url(part_mb="0.25")), **options)


def test_the_local_tier_keeps_to_its_quota_dropping_least_recently_used_copies(
    server: RedisServer, tmp_path: Path
):
    tiered = tiered_store(server, tmp_path / "tier", local_quota=10**9)
    segs = [make_segment(ROOT, 0, [i], 200_000) for i in range(8)]
    for i, (seg, data) in enumerate(segs):
        tiered.put(seg, data)
        tiered.touch(seg.key, 1000.0 + i)
    tiered.touch(segs[0][0].key, 2000.0)  # the oldest copy, used most recently
    tiered.flush()
    assert tiered.local.total_bytes() == 1_600_000
    tiered.local_quota = 1_000_000
    newest, newest_data = make_segment(ROOT, 0, [99], 200_000)
    tiered.put(newest, newest_data)  # over the quota: shrunk in the background
    tiered.flush()
    # Down to 90% of the quota, least recently used first.
    assert tiered.local.total_bytes() == 800_000
    kept = {segs[0][0].key, segs[6][0].key, segs[7][0].key, newest.key}
    assert tiered.local.keys() == kept
    assert tiered.stats()["local_evicted"] == 5
    # The remote keeps everything; a dropped copy is fetched again (and copied back).
    assert tiered.keys() == {s.key for s, _ in segs} | {newest.key}
    assert read(tiered, segs[1][0]) == segs[1][1]
    tiered.flush()
    assert segs[1][0].key in tiered.local.keys()  # noqa: SIM118 (a set, not a dict)
    assert tiered.local.total_bytes() <= tiered.local_quota


def test_segments_only_the_local_tier_holds_go_only_if_unpinned_and_leaves_first(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    tiered = tiered_store(server, tmp_path / "tier", local_quota=10**9, retry_after=60)
    server.kill()  # what is stored now exists only in the local tier
    a, a_data = make_segment(ROOT, 0, [1], 100_000)
    b, b_data = make_segment(a.key, 1, [2], 100_000)
    c, c_data = make_segment(b.key, 2, [3], 100_000)
    d, d_data = make_segment(ROOT, 0, [4], 100_000)
    e, e_data = make_segment(d.key, 1, [5], 100_000)
    for seg, data in [(a, a_data), (b, b_data), (c, c_data), (d, d_data), (e, e_data)]:
        assert tiered.put(seg, data)
    tiered.set_pin(Pin("p", b.key, ROOT, 2, time.time()))
    tiered.touch(d.key, 3000.0)  # d is more recent than its child e, but e is the leaf
    tiered.local_quota = 1
    caplog.clear()
    assert tiered.shrink_local() == 300_000
    assert tiered.local.keys() == {a.key, b.key}  # the pinned chain stays, whole
    assert any("pinned and held only here" in r.getMessage() for r in caplog.records)


def test_copies_waiting_for_the_local_tier_are_bounded_in_bytes(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    writer = RedisStore(server.url(part_mb="0.25"))
    segs = [make_segment(ROOT, 0, [i], 300_000) for i in range(10)]
    for seg, data in segs:
        writer.put(seg, data)
    tiered = tiered_store(server, tmp_path / "tier", write_back_bytes=1_000_000)
    caplog.set_level(logging.INFO, logger="prefixcache")
    # Another process holds the local tier's database: the first copy waits for it.
    db = sqlite3.connect(tiered.local.path / "cache.db", timeout=0, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        for seg, data in segs:
            assert read(tiered, seg) == data  # restores never wait for a copy
        waiting = tiered._pending_bytes
    finally:
        db.execute("ROLLBACK")
        db.close()
    tiered.flush()
    assert waiting == 900_000  # three copies fit in 1 MB; the other seven were skipped
    assert tiered.stats()["write_backs_dropped"] == 7
    assert len(tiered.local.keys()) == 3
    assert len([r for r in caplog.records if "not copied" in r.getMessage()]) == 1
    # A skipped copy is made when its segment is read again (and the copies have room).
    for seg, data in segs:
        assert read(tiered, seg) == data
        tiered.flush()
    assert tiered.local.keys() == {s.key for s, _ in segs}


def test_one_segment_larger_than_the_bound_is_still_copied(server: RedisServer, tmp_path: Path):
    seg, data = make_segment(ROOT, 0, [1], 2_000_000)
    RedisStore(server.url(part_mb="0.25")).put(seg, data)
    tiered = tiered_store(server, tmp_path / "tier", write_back_bytes=1_000_000)
    assert read(tiered, seg) == data
    tiered.flush()
    assert tiered.local.keys() == {seg.key} and tiered.write_backs_dropped == 0


def test_a_tiered_store_rides_out_redis_killed_and_restarted_mid_run(
    server: RedisServer, tmp_path: Path
):
    tiered = tiered_store(server, tmp_path / "tier", retry_after=0.05)
    other = RedisStore(server.url(part_mb="0.25"))
    stop = threading.Event()
    unexpected: list[str] = []
    done = [0, 0, 0]

    def work(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            mine, mine_data = make_segment(ROOT, 0, [n, i], 40_000 + 1000 * n)
            theirs, theirs_data = make_segment(ROOT, 0, [n, i, 0], 600_000)
            try:
                tiered.put(mine, mine_data)
                assert read(tiered, mine) == mine_data  # always: the local tier has it
                tiered.touch(mine.key, time.time())
                tiered.keys()
                tiered.generation()
                tiered.usage()
                list(tiered.segments())
                with tiered.lock("evict", timeout=5):
                    pass
                try:
                    other.put(theirs, theirs_data)  # another worker; it may see the outage
                except StoreUnavailableError:
                    continue
                found = tiered.get(theirs.key)
                if found is not None:
                    assert read(tiered, found) == theirs_data
            except (StoreUnavailableError, CorruptSegmentError):
                # Only from reading a segment that is only in the remote: killed mid-read, or
                # restarted empty between get and read_kv. The cache prefills instead.
                pass
            except Exception as exc:
                unexpected.append(f"{type(exc).__name__}: {exc}")
            done[n] += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    gens = set()
    try:
        for _ in range(3):
            time.sleep(0.4)
            server.kill()
            time.sleep(0.3)
            gens.add(tiered.generation())
            server.start()
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert unexpected == []
    assert min(done) > 5
    tiered.flush()
    # Sharing resumed on the last (empty) server: new segments reach it, the index follows.
    fresh, fresh_data = make_segment(ROOT, 0, [12345], 1000)
    assert tiered.put(fresh, fresh_data)
    assert tiered.remote_up and other.get(fresh.key) == fresh
    assert tiered.generation() not in gens
    assert fresh.key in tiered.keys()  # noqa: SIM118 (a set)
    tiered.gc()
    assert tiered.local.keys() <= tiered.keys()
