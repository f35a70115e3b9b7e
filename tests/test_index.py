"""The index follows a store that other processes write to, at the cost of what changed.

Consistency: two processes put, delete (also segments with children) and pin at random on one
store, and every lookup either makes equals a brute-force match over the store's contents read
in the same quiet window. Cost: a lookup after another process wrote reads only the changes of
its own namespace, never the segments of other namespaces.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_redis import RedisServer, cluster  # noqa: F401 (cluster: a fixture used below)

from prefixcache.catalog import Catalog
from prefixcache.segment import Segment, checksum, root_key, segment_key
from prefixcache.store import DiskStore, Store, open_store
from prefixcache.store.redis import RedisStore

WORKER = Path(__file__).parent / "workers" / "index_worker.py"
DIGEST = "c" * 64  # the worker's fingerprint digest
ITERATIONS = 120


class Fingerprint:
    digest = DIGEST


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis")
    yield server.url(local=str(tmp_path / "tier"))
    server.kill()


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_every_lookup_matches_the_store_while_two_processes_write(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
):
    url = request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path / "store")
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, str(seed), str(ITERATIONS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = []
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # Most lookups fell in a quiet window (the rest raced a write and were not comparable).
    assert all(r["checked"] >= ITERATIONS for r in results), results
    # And a process that opens the store now sees the same as the brute force.
    sys.path.insert(0, str(WORKER.parent))
    try:
        from index_worker import brute_match
    finally:
        sys.path.remove(str(WORKER.parent))
    store = open_store(url)
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    for ns in ("a", "b"):
        for prompt in ([1, 2, 3, 1, 2, 3], [3, 3, 2, 1], [2] * 9):
            assert catalog.sync(ns).index.match(prompt) == brute_match(
                store, catalog.root(ns), prompt
            )
    store.close()


class CountingStore(DiskStore):
    """A DiskStore that counts the segment reads and listings the index makes."""

    def __init__(self, path: Any):
        super().__init__(path)
        self.reads = 0

    def get(self, key: str) -> Segment | None:
        self.reads += 1
        return super().get(key)

    def keys(self) -> set[str]:
        self.reads += 1000  # a listing of every key
        return super().keys()


def _put(store: Store, ns: str, tokens: list[int]) -> Segment:
    root = root_key(DIGEST, ns)
    seg = Segment(
        key=segment_key(root, tokens),
        parent=root,
        root=root,
        start=0,
        tokens=tuple(tokens),
        nbytes=2,
        checksum=checksum(b"kv"),
        fingerprint=DIGEST,
        namespace=ns,
        created=time.time(),
    )
    store.put(seg, b"kv")
    return seg


def test_a_lookup_after_another_process_wrote_reads_only_what_changed(tmp_path: Path):
    path = tmp_path / "store"
    writer = DiskStore(path)  # another process's handle: its writes are news to the reader
    mine = _put(writer, "a", [1, 2, 3])
    for i in range(300):
        _put(writer, "other", [i, i + 1, i + 2])  # another tenant's segments
    reader = CountingStore(path)
    catalog = Catalog(reader, Fingerprint())  # type: ignore[arg-type]
    assert catalog.sync("a").index.match([1, 2, 3, 4]).chain == (mine.key,)
    assert catalog.sync("b").index.match([1, 2, 3]).length == 0  # another namespace: empty
    reader.reads = 0
    _put(writer, "other", [7, 7, 7])
    new = _put(writer, "a", [1, 2, 3, 4, 5])
    writer.delete(mine.key)
    known = catalog.sync("a")
    assert known.index.match([1, 2, 3, 4, 5]).chain == (new.key,)
    assert mine.key not in known.segments
    assert catalog.sync("b").index.match([1, 2, 3]).length == 0
    catalog.sync("a")  # switching back keeps a's index: nothing to read again
    assert reader.reads == 0  # no segment read one by one, no listing of the store's keys


def test_the_change_log_works_on_a_redis_cluster(cluster: list[RedisServer]):  # noqa: F811
    store = RedisStore(cluster[0].url(cluster="1"))
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    first = _put(store, "a", [1, 2, 3])
    assert catalog.sync("a").index.match([1, 2, 3, 4]).chain == (first.key,)
    for i in range(20):  # segments spread over the nodes' slots
        _put(store, "a", [5, i])
    store.delete(first.key)
    known = catalog.sync("a")
    assert first.key not in known.segments and len(known.segments) == 20
    assert known.index.match([5, 7]).length == 2
    assert store.gc().broken == 0
    assert Catalog(store, Fingerprint()).sync("a").segments.keys() == known.segments.keys()  # type: ignore[arg-type]
    store.close()


def test_a_store_written_before_the_change_log_is_indexed_once(tmp_path: Path):
    path = tmp_path / "store"
    store = DiskStore(path)
    seg = _put(store, "a", [1, 2, 3])
    store.close()
    # What a store written by an earlier version looks like: no log table, no format mark.
    with sqlite3.connect(path / "cache.db") as db:
        db.execute("DROP TABLE prefixcache_index")
        db.execute("DELETE FROM Cache WHERE key = 'index-format'")
    catalog = Catalog(DiskStore(path), Fingerprint())  # type: ignore[arg-type]
    assert catalog.sync("a").index.match([1, 2, 3]).chain == (seg.key,)


def test_a_redis_store_written_before_the_change_log_is_indexed_once(redis_url: str):
    store = RedisStore(redis_url)
    seg = _put(store, "a", [1, 2, 3])
    client = store.client
    for name in client.keys("pc:{idx}:*"):
        if name.decode().split(":")[2] in ("rows", "log", "dead", "floor", "index-format"):
            client.delete(name)
    catalog = Catalog(RedisStore(redis_url), Fingerprint())  # type: ignore[arg-type]
    assert catalog.sync("a").index.match([1, 2, 3]).chain == (seg.key,)
