"""The index follows a store that other processes write to, at the cost of what changed.

Consistency: two processes put, delete (also segments with children) and pin at random on one
store, and every lookup either makes equals a brute-force match over the store's contents read
in the same quiet window. Cost: a lookup after another process wrote reads only the changes of
its own namespace, never the segments of other namespaces.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ask, cached, text
from test_redis import RedisServer, cluster  # noqa: F401 (cluster: a fixture used below)

import prefixcache.catalog
import prefixcache.segment
from prefixcache.catalog import Catalog
from prefixcache.explain import DIVERGED_IN_PIN, explain_tokens
from prefixcache.segment import Pin, Segment, checksum, head_key, root_key, segment_key
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


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_every_lookup_matches_the_store_while_two_processes_write(
    kind: str, mode: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: Any
):
    """In sparse mode (namespaces over 3 segments, heads of 2 tokens) an answer may miss what
    the prompt leaves within a segment's first 2 tokens, and nothing else."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path / "store")
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, str(seed), str(ITERATIONS), mode],
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
    if mode == "sparse":  # most lookups went through a sparse index
        assert all(r["sparse"] >= ITERATIONS for r in results), results
    # And a process that opens the store now sees the same as the brute force.
    sys.path.insert(0, str(WORKER.parent))
    try:
        from index_worker import brute_match, check_sparse
    finally:
        sys.path.remove(str(WORKER.parent))
    if mode == "sparse":
        monkeypatch.setattr(prefixcache.segment, "HEAD_TOKENS", 2)
        monkeypatch.setattr(prefixcache.catalog, "HEAD_TOKENS", 2)
        monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 3)
    store = open_store(url)
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    for ns in ("a", "b"):
        for prompt in ([1, 2, 3, 1, 2, 3], [3, 3, 2, 1], [2] * 9):
            root = catalog.root(ns)
            got = catalog.sync(ns, prompt).index.match(prompt)
            if mode == "sparse":
                assert check_sparse(store, root, prompt, got, 2) is None
            else:
                assert got == brute_match(store, root, prompt)
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
    """Store ``tokens`` as one segment at the root of ``ns``."""
    (seg,) = _chain(store, ns, [tokens])
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


def test_the_change_log_works_on_a_redis_cluster(
    cluster: list[RedisServer],  # noqa: F811
    monkeypatch: Any,
):
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
    # A sparse lookup: the head sets and the script that reads them are in the index's slot.
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 0)
    sparse = Catalog(store, Fingerprint()).sync("a", [5, 7, 9])  # type: ignore[arg-type]
    assert sparse.sparse and sparse.index.match([5, 7, 9]).length == 2
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


# --- sparse indexes: namespaces too large to list ---------------------------------------------


class Counting:
    """A store whose change-log reads are counted (rows returned, queries made)."""

    def __init__(self, store: Any):
        self.store = store
        self.rows = 0
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def changes(self, root: str, since: int, *, limit: int | None = None) -> Any:
        delta = self.store.changes(root, since, **({} if limit is None else {"limit": limit}))
        self.rows += len(delta.added) + len(delta.removed)
        self.queries += 1
        return delta

    def children(self, root: str, heads: Any) -> Any:
        found = self.store.children(root, heads)
        self.rows += len(found)
        self.queries += 1
        return found


def _chain(store: Store, ns: str, parts: list[list[int]], parent: Segment | None = None) -> list:
    """Store ``parts`` as a chain of segments (after ``parent``); returns the segments."""
    root = root_key(DIGEST, ns)
    out = []
    p, start = (root, 0) if parent is None else (parent.key, parent.end)
    for tokens in parts:
        seg = Segment(
            key=segment_key(p, tokens),
            parent=p,
            root=root,
            start=start,
            tokens=tuple(tokens),
            nbytes=2,
            checksum=checksum(b"kv"),
            fingerprint=DIGEST,
            namespace=ns,
            created=time.time(),
        )
        store.put(seg, b"kv")
        out.append(seg)
        p, start = seg.key, seg.end
    return out


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_fresh_lookup_in_a_large_namespace_reads_only_the_prompts_path(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: Any
):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 100)
    url = request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path / "store")
    writer = open_store(url)
    rng = random.Random(7)
    prompt = [rng.randrange(1, 50000) for _ in range(128)]
    path = _chain(writer, "a", [prompt[i : i + 32] for i in range(0, 128, 32)])
    for _ in range(1500):  # continuations of each segment of the path, and other conversations
        after = rng.choice([None, *path])
        _chain(writer, "a", [[rng.randrange(1, 50000) for _ in range(16)]], after)
    reader = Counting(open_store(url))
    catalog = Catalog(reader, Fingerprint())  # type: ignore[arg-type]
    known = catalog.sync("a", [*prompt, 1, 2])
    assert known.sparse
    assert known.index.match([*prompt, 1, 2]).chain == tuple(s.key for s in path)
    assert reader.rows <= 10 and reader.queries <= 6, (reader.rows, reader.queries)
    assert len(known.segments) <= 10  # not the namespace's 1,504 segments
    # Steady: nothing read. After a write: only what changed.
    reader.rows = reader.queries = 0
    catalog.sync("a", [*prompt, 1, 2])
    assert (reader.rows, reader.queries) == (0, 1)
    tail = _chain(writer, "a", [[1, 2, 3]], path[-1])
    known = catalog.sync("a", [*prompt, 1, 2, 3])
    assert known.index.match([*prompt, 1, 2, 3]).chain == (*(s.key for s in path), tail[0].key)
    assert reader.rows <= 3
    writer.delete(tail[0].key)
    assert catalog.sync("a", [*prompt, 1, 2, 3]).index.match([*prompt, 1, 2, 3]).length == 128
    writer.close()


def test_a_tiered_store_serves_a_sparse_lookup_from_its_local_tier_in_an_outage(
    tmp_path: Path, monkeypatch: Any
):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 0)
    server = RedisServer(tmp_path / "redis")
    store = open_store(server.url(local=str(tmp_path / "tier")))
    prompt = list(range(1, 41))
    path = _chain(store, "a", [prompt[:20], prompt[20:]])
    want = tuple(s.key for s in path)
    assert Catalog(store, Fingerprint()).sync("a", prompt).index.match(prompt).chain == want  # type: ignore[arg-type]
    server.kill()  # the index now follows the local tier (which every put also wrote)
    known = Catalog(store, Fingerprint()).sync("a", prompt)  # type: ignore[arg-type]
    assert known.sparse and known.index.match(prompt).chain == want
    store.close()


def test_a_sparse_index_stays_under_its_memory_cap(tmp_path: Path, monkeypatch: Any):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 10)
    monkeypatch.setattr(prefixcache.catalog, "SPARSE_MAX_TOKENS", 1000)
    store = DiskStore(tmp_path / "store")
    rng = random.Random(3)
    prompts = []
    for _ in range(200):
        prompt = [rng.randrange(1, 50000) for _ in range(64)]
        _chain(store, "a", [prompt[:32], prompt[32:]])
        prompts.append(prompt)
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    most = 0
    for prompt in prompts + prompts[:50]:
        known = catalog.sync("a", prompt)
        assert known.sparse and known.index.match(prompt).length == 64
        most = max(most, known.held)
    # The cap, plus at most what one lookup brings in (its prompt's path).
    assert 1000 <= most <= 1000 + 64
    store.close()


def test_a_prompt_whose_walk_is_over_the_cap_is_not_read_again_at_every_lookup(
    tmp_path: Path, monkeypatch: Any
):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 10)
    monkeypatch.setattr(prefixcache.catalog, "SPARSE_MAX_TOKENS", 1000)
    store = DiskStore(tmp_path / "store")
    rng = random.Random(5)
    prompt = [rng.randrange(1, 50000) for _ in range(64)]
    (head,) = _chain(store, "a", [prompt[:32]])
    _chain(store, "a", [prompt[32:]], head)
    for _ in range(60):  # near misses: they follow the prompt for 16 tokens, then diverge
        _chain(store, "a", [[*prompt[32:48], *(rng.randrange(1, 50000) for _ in range(24))]], head)
    counting = Counting(store)
    catalog = Catalog(counting, Fingerprint())  # type: ignore[arg-type]
    known = catalog.sync("a", prompt)
    assert known.index.match(prompt).length == 64 and known.held > 2000  # one walk, over the cap
    rows, queries = counting.rows, counting.queries
    for _ in range(3):
        assert catalog.sync("a", prompt).index.match(prompt).length == 64
    assert counting.rows == rows  # nothing read again
    assert counting.queries == queries + 3  # only the change log, once a lookup
    store.close()


def test_a_disk_store_without_heads_gets_them_once_and_old_writers_still_fit(tmp_path: Path):
    path = tmp_path / "store"
    store = DiskStore(path)
    (seg,) = _chain(store, "a", [[1, 2, 3]])
    store.close()
    with sqlite3.connect(path / "cache.db") as db:  # a store written before heads existed
        db.execute("DROP TABLE prefixcache_heads")
        db.execute("DELETE FROM Cache WHERE key = 'index-heads'")
    store = DiskStore(path)
    assert store.children(seg.root, [head_key(seg.root, [1, 2, 3])]) == (seg,)
    assert store.children(seg.root, [head_key(seg.root, [1, 2])]) == ()
    # A process of the earlier version writes rows of four values and no head: gc adds it.
    (old,) = _chain(store, "a", [[4, 5]])
    with sqlite3.connect(path / "cache.db") as db:
        db.execute("DELETE FROM prefixcache_heads WHERE key = ?", (old.key,))
        db.execute("INSERT INTO prefixcache_index VALUES (?, ?, ?, ?)", ("x", old.root, 0, None))
    assert store.children(old.root, [head_key(old.root, [4, 5])]) == ()
    store.gc()
    assert store.children(old.root, [head_key(old.root, [4, 5])]) == (old,)
    store.close()


def test_a_redis_store_without_head_sets_gets_them_once(redis_url: str):
    store = RedisStore(redis_url)
    (seg,) = _chain(store, "a", [[1, 2, 3]])
    client = store.client
    for name in client.keys("pc:{idx}:head:*"):
        client.delete(name)
    client.delete("pc:{idx}:heads-format")
    store = RedisStore(redis_url)
    assert store.children(seg.root, [head_key(seg.root, [1, 2, 3])]) == (seg,)
    store.delete(seg.key)
    assert store.children(seg.root, [head_key(seg.root, [1, 2, 3])]) == ()
    assert not client.keys("pc:{idx}:head:*")  # the delete emptied its head set


def test_a_restore_through_a_sparse_index_matches_cold_output(
    open_cache: Any, cold_reply: Any, monkeypatch: Any
):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 0)  # every namespace is large
    turn1 = ask("Do you cut timber?")
    reply1 = open_cache().chat(turn1, max_tokens=16, temperature=0)
    turn2 = [*turn1, reply1["choices"][0]["message"], {"role": "user", "content": "How long?"}]
    warm = open_cache()  # a new Llama and a new index: the KV can only come from the store
    reply2 = warm.chat(turn2, max_tokens=16, temperature=0)
    assert warm.catalog.sync(warm.namespace).sparse
    assert cached(reply2) >= reply1["usage"]["prompt_tokens"]
    assert text(reply2) == cold_reply(turn2, max_tokens=16)


def test_a_divergence_inside_a_pin_is_explained_through_a_sparse_index(
    tmp_path: Path, monkeypatch: Any
):
    monkeypatch.setattr(prefixcache.catalog, "FULL_LISTING_MAX", 0)
    store = DiskStore(tmp_path / "store")
    pinned = list(range(100, 148))
    chain = _chain(store, "a", [pinned[:16], pinned[16:32], pinned[32:]])
    store.set_pin(Pin("base", chain[-1].key, chain[0].root, 48, time.time()))
    prompt = [*pinned[:26], 7, 7, 7]  # leaves the pin inside its second segment
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    known = catalog.sync("a", prompt)
    assert known.sparse and chain[-1].key not in known.index  # not on the prompt's path
    pins = catalog.with_pins(known, store.pins())
    why = explain_tokens(known, prompt, pins, lambda toks: " ".join(map(str, toks)), "a")
    assert why.kind == DIVERGED_IN_PIN and why.divergence is not None
    assert why.divergence.pin == "base" and why.matched_tokens == 26
