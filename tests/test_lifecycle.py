"""Store lifecycle: quota and eviction order, pins and TTLs, integrity, permissions, threads."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import SYSTEM

from prefixcache import CorruptSegmentError, DiskStore, Pin, QuotaExceededError, Segment
from prefixcache.lifecycle import enforce_quota, pinned_keys
from prefixcache.segment import checksum, checksum_matches, root_key, segment_key

ROOT = root_key("f" * 32)


def put(
    store: DiskStore,
    parent: str,
    start: int,
    tokens: list[int],
    size: int = 1000,
    data: bytes | None = None,
) -> str:
    """Store a segment with stand-in KV bytes (random ones unless ``data`` is given: the store
    is bytes in, bytes out)."""
    data = os.urandom(size) if data is None else data
    key = segment_key(parent, tokens)
    seg = Segment(
        key=key,
        parent=parent,
        root=ROOT,
        start=start,
        tokens=tuple(tokens),
        nbytes=len(data),
        checksum=checksum(data),
        fingerprint="f" * 32,
        created=time.time(),
    )
    store.put(seg, data)
    return key


def test_checksums_catch_one_flipped_bit_and_read_older_crc32_records():
    data = bytearray(os.urandom(1 << 16))
    stored = checksum(data)
    assert stored.startswith("xxh3:") and checksum_matches(data, stored)
    legacy = f"crc32:{zlib.crc32(data):08x}"  # what segments stored before XXH3 carry
    assert checksum_matches(data, legacy)
    data[12345] ^= 0x10
    assert not checksum_matches(data, stored)
    assert not checksum_matches(data, legacy)
    assert not checksum_matches(data, "md5:" + "0" * 32)  # an unknown algorithm never passes


def test_segments_round_trip_and_puts_are_idempotent(tmp_path: Path):
    store = DiskStore(tmp_path)
    key = put(store, ROOT, 0, [1, 2, 3], size=300_000)
    seg = store.get(key)
    assert seg is not None and seg.end == 3
    buf = bytearray(seg.nbytes)
    store.read_kv(seg, memoryview(buf))
    assert checksum(buf) == seg.checksum
    assert not store.put(seg, buf)  # same key: stored once
    assert store.total_bytes() == 300_000 and store.keys() == {key}


def test_kv_bytes_map_from_their_file_which_is_replaced_never_rewritten(tmp_path: Path):
    store = DiskStore(tmp_path)
    seg = store.get(put(store, ROOT, 0, [1, 2, 3], size=300_000))
    assert seg is not None
    original = bytearray(seg.nbytes)
    store.read_kv(seg, memoryview(original))
    (path,) = [p for p in tmp_path.rglob("*.val") if p.stat().st_size == seg.nbytes]
    with store.map_kv(seg) as view:
        assert view is not None and view == original
        # A writer replaces a value's file (a new file, the old one unlinked); the mapping
        # keeps the bytes that were checksummed.
        fresh = path.with_suffix(".tmp")
        fresh.write_bytes(b"\0" * seg.nbytes)
        os.replace(fresh, path)
        assert view == original and checksum_matches(view, seg.checksum)


def _store_racer(path: str, me: int, rounds: int, barrier: Any) -> None:
    """One of two processes storing the same segments at once, each with bytes of its own."""
    store = DiskStore(path)
    data = bytes([me + 1]) * 1_000_000
    for i in range(rounds):
        barrier.wait()
        put(store, ROOT, 0, [i, i + 1], data=data)


def test_two_processes_storing_one_segment_leave_bytes_that_match_its_checksum(tmp_path: Path):
    """The metadata published is the bytes' own: a racer's write never lands under it.

    Both writers may pass put()'s first check before either publishes (the fuzz found this:
    two chats of one conversation autosaving at once, one of them with a one-token batch, so
    bytes that differ). Their bytes used to replace each other's after the first published its
    checksum: 200 of 300 segments mismatched, and their next restore quarantined them.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    rounds = 150
    racers = [
        ctx.Process(target=_store_racer, args=(str(tmp_path), me, rounds, barrier))
        for me in range(2)
    ]
    for proc in racers:
        proc.start()
    for proc in racers:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    store = DiskStore(tmp_path)
    bad = []
    for i in range(rounds):
        seg = store.get(segment_key(ROOT, [i, i + 1]))
        assert seg is not None
        with store.map_kv(seg) as view:
            if view is None or not checksum_matches(view, seg.checksum):
                bad.append(i)
    assert bad == []
    assert store.total_bytes() == rounds * 1_000_000


@pytest.mark.parametrize("size", [299_999, 300_001, 0])
def test_a_kv_file_of_the_wrong_size_is_corrupt_before_it_is_mapped(tmp_path: Path, size: int):
    store = DiskStore(tmp_path)
    seg = store.get(put(store, ROOT, 0, [1, 2, 3], size=300_000))
    assert seg is not None
    (path,) = list(tmp_path.rglob("*.val"))
    os.truncate(path, size)  # in place: what diskcache never does, a damaged store might
    with pytest.raises(CorruptSegmentError, match="expected 300000 bytes"), store.map_kv(seg):
        pytest.fail("a file of the wrong size must not be mapped")


def test_quota_evicts_lru_leaves_first_and_never_pins(tmp_path: Path):
    store = DiskStore(tmp_path)
    base = put(store, ROOT, 0, [1, 2])
    pinned_leaf = put(store, base, 2, [3])
    old_leaf = put(store, base, 2, [4])
    mid = put(store, base, 2, [5])
    new_leaf = put(store, mid, 3, [6])
    store.set_pin(Pin("p", pinned_leaf, ROOT, 3, time.time()))
    now = time.time()
    for key, age in [(old_leaf, 300), (mid, 200), (new_leaf, 100)]:
        store.touch(key, now - age)
    result = enforce_quota(store, 3000, now)
    # old_leaf goes first (least recent); mid has a child so new_leaf must go before it.
    assert result.evicted == (old_leaf, new_leaf)
    assert store.keys() == {base, pinned_leaf, mid}
    result = enforce_quota(store, 1000, now)
    assert result.evicted == (mid,)  # the pinned chain (base, pinned_leaf) stays over quota
    assert store.keys() == {base, pinned_leaf}


def test_expired_pins_become_ordinary_entries(tmp_path: Path):
    store = DiskStore(tmp_path)
    key = put(store, ROOT, 0, [1])
    store.set_pin(Pin("p", key, ROOT, 1, time.time(), expires=time.time() + 0.2))
    segments = {s.key: s for s in store.segments()}
    assert pinned_keys(store, segments, time.time()) == {key}
    assert enforce_quota(store, 0, time.time()).evicted == ()
    time.sleep(0.3)
    assert pinned_keys(store, segments, time.time()) == set()
    assert enforce_quota(store, 0, time.time()).evicted == (key,)


def test_store_files_are_user_only(tmp_path: Path):
    store = DiskStore(tmp_path / "s")
    put(store, ROOT, 0, [1], size=200_000)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in files)


def test_gc_reclaims_bytes_of_an_interrupted_write(tmp_path: Path):
    store = DiskStore(tmp_path)
    key = put(store, ROOT, 0, [1], size=200_000)
    # What a process killed between writing the bytes and publishing the metadata leaves.
    store._cache.set("kv:" + "0" * 64, b"x" * 200_000)
    # What a process killed inside diskcache's file write leaves: a file without a row.
    stray = tmp_path / "ab" / "cd"
    stray.mkdir(parents=True)
    (stray / "0123456789abcdef0123456789ab.val").write_bytes(b"y" * 1000)
    report = store.gc()
    assert report.orphans == 1
    assert not (stray / "0123456789abcdef0123456789ab.val").exists()
    assert store.keys() == {key} and store.total_bytes() == 200_000


def test_unpickling_is_refused(tmp_path: Path):
    store = DiskStore(tmp_path)
    store._cache.set("seg:evil", b"")  # fine: bytes
    from prefixcache import StoreError

    with pytest.raises(StoreError, match="must be bytes or str"):
        store._cache.set("doc:x", {"a": 1})
    # A row that claims to be a pickle (written by something else) is never unpickled.
    store._cache._sql(
        "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
        " size, mode, filename, value) VALUES ('doc:bad', 1, 0, NULL, 0, 0, NULL, 0, 4, NULL, ?)",
        (b"cos\nsystem\n(S'echo pwned'\ntR.",),
    )
    with pytest.raises(StoreError, match="unpickle"):
        store.get_doc("bad")


# On the real model -------------------------------------------------------------------------


def test_pinning_past_the_quota_is_a_clear_error(open_cache):
    cache = open_cache(quota_gb=0.001)  # 1 MB: the system prompt needs several
    with pytest.raises(QuotaExceededError, match="already pinned") as err:
        cache.pin([SYSTEM], name="hw")
    assert err.value.quota_bytes == 1_000_000 and err.value.needed_bytes > 1_000_000
    assert cache.store.keys() == set() and cache.store.pins() == []  # nothing half-written


def test_autosave_under_a_quota_evicts_but_keeps_the_pin(open_cache, cold_reply):
    cache = open_cache(quota_gb=0.008)
    info = cache.pin([SYSTEM], name="hw")
    for i in range(4):
        q = [SYSTEM, {"role": "user", "content": f"Question {i}: " + "tell me more " * 40}]
        cache.chat(q, max_tokens=2, temperature=0)
    assert cache.store.total_bytes() <= 8_000_000
    assert info.key in set(cache.store.keys())
    reply = open_cache(quota_gb=0.008).chat(
        [SYSTEM, {"role": "user", "content": "Hi"}], max_tokens=16, temperature=0
    )
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= info.n_tokens
    assert reply["choices"][0]["message"]["content"] == cold_reply(
        [SYSTEM, {"role": "user", "content": "Hi"}], max_tokens=16
    )


def test_a_pin_is_named_before_an_evictor_can_take_its_segments(open_cache, store, monkeypatch):
    """Another process evicting everything unpinned, between the pin's writes and its naming,
    left a dangling pin (test_multiprocess saw two processes prefill the shared prefix)."""
    cache = open_cache()
    evictor = DiskStore(store)  # another handle on the store, as another process has
    evictions: list[threading.Thread] = []
    put = cache.store.put

    def put_then_evict(seg: Segment, kv: Any) -> bool:
        stored = put(seg, kv)
        thread = threading.Thread(target=enforce_quota, args=(evictor, 0, time.time()))
        thread.start()
        thread.join(timeout=0.5)  # a free evictor is done by then; one that waits, waits on
        evictions.append(thread)
        return stored

    monkeypatch.setattr(cache.store, "put", put_then_evict)
    info = cache.pin([SYSTEM], name="shared")
    for thread in evictions:
        thread.join()
    assert evictions and info.evaluated_tokens > 100
    assert evictor.get(info.key) is not None
    again = open_cache().pin([SYSTEM], name="shared")
    assert again.evaluated_tokens == 0 and again.key == info.key


def test_quarantine_takes_descendants_along(open_cache, store):
    cache = open_cache()
    info = cache.pin([SYSTEM], name="hw")
    # No reply prefilled ahead: the test counts the prompt's descendants only.
    turn = [SYSTEM, {"role": "user", "content": "child turn"}]
    cache.chat(turn, max_tokens=2, prefill_replies=False)
    assert len(cache.store.keys()) == 2
    seg = cache.store.get(info.key)
    assert seg is not None
    handle = cache.store._cache.get("kv:" + info.key, read=True)
    path = Path(handle.name)
    handle.close()
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    fresh = open_cache()
    fresh.chat(turn, max_tokens=2, prefill_replies=False)
    assert fresh.store.get_doc("quarantine")[info.key]["descendants"] == 1
    # The damaged pin and its child are gone; autosave stored the same system prompt again from
    # this call's prefill (a segment ends where the last message begins): same key, new bytes.
    assert fresh.store.get(info.key).label == "autosave"
    assert len(fresh.store.keys()) == 2


def test_a_segment_stored_again_during_its_read_is_not_quarantined(
    open_cache, store, monkeypatch, cold_reply
):
    """A read that fails because another process deleted and stored the segment again (its
    file went away between the row and the open) quarantined a sound segment."""
    info = open_cache().pin([SYSTEM], name="hw")
    other = DiskStore(store)  # another process's handle
    cache = open_cache()
    map_kv = cache.store.map_kv
    raced: list[str] = []

    def map_while_another_stores_it_again(seg: Segment) -> Any:
        if not raced:
            raced.append(seg.key)
            kept = other.get(seg.key)
            assert kept is not None
            data = bytearray(kept.nbytes)
            other.read_kv(kept, memoryview(data))
            other.delete(seg.key)
            other.put(kept, data)
            raise CorruptSegmentError(seg.key, "its KV bytes are missing")
        return map_kv(seg)

    monkeypatch.setattr(cache.store, "map_kv", map_while_another_stores_it_again)
    turn = [SYSTEM, {"role": "user", "content": "Hi"}]
    first = cache.chat(turn, max_tokens=8, temperature=0, prefill_replies=False)
    assert raced == [info.key]
    assert first["choices"][0]["message"]["content"] == cold_reply(turn, max_tokens=8)
    assert cache.stats()["corrupt_segments"] == 0
    assert other.get_doc("quarantine") is None and other.get(info.key) is not None
    again = cache.chat(turn, max_tokens=8, temperature=0, prefill_replies=False)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= info.n_tokens


def test_threads_share_one_cache_safely(open_cache, cold_reply):
    cache = open_cache()
    cache.pin([SYSTEM], name="hw")
    questions = [f"Do you sell item number {i}?" for i in range(4)]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        reply = cache.chat(
            [SYSTEM, {"role": "user", "content": questions[i]}], max_tokens=12, temperature=0
        )
        results[i] = reply["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, q in enumerate(questions):
        assert results[i] == cold_reply([SYSTEM, {"role": "user", "content": q}], max_tokens=12)


def test_cost_model_is_measured_and_sets_the_minimum_span(open_cache):
    cache = open_cache()
    cal = cache.calibrate(n_tokens=128)
    assert cal.prefill_tokens_per_s > 10 and cal.restore_bytes_per_s > 1e7
    assert 20_000 < cal.bytes_per_token < 26_000
    assert 1 <= cal.min_span_tokens() < 64
    # A machine where restoring is slower than prefilling would never autosave.
    cal.restore_bytes_per_s = cal.bytes_per_token * cal.prefill_tokens_per_s / 2
    assert cal.min_span_tokens() > 10**6
    cache.chat([SYSTEM, {"role": "user", "content": "Hi"}], max_tokens=2)
    assert cache.store.keys() == set()
    doc = open_cache().calibration
    assert doc.prefill_tokens_per_s > 10  # persisted for the next process and for status
