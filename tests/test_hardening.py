"""Any order of calls, any store failure, any thread: the answer arrives and nothing valid is lost.

Each test reproduces a failure found by a differential run or a review (issue 12) on the real
model and a real store.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from conftest import N_CTX, SYSTEM, ask, cached, text

from prefixcache import PrefixCache, lifecycle, open_store
from prefixcache.segment import checksum


def on_thread(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run ``fn`` on a new thread; fail (instead of hanging) if it does not return in time."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"call did not return within {timeout}s: the model is locked")
    finally:
        pool.shutdown(wait=False)


# --- any order of calls --------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["chat", "complete"])
def test_pin_after_a_call_that_autosaved_past_its_boundary(open_cache, cold_reply, first):
    """Pinning a head that autosave already stored inside a longer segment used to crash with
    "cannot capture [n, n) of n live tokens"."""
    cache = open_cache()
    messages = ask("What is a hammer for?")
    if first == "chat":
        cache.chat(messages, max_tokens=8, temperature=0)
    else:
        cache.complete(cache.template.tokens(messages), max_tokens=8, temperature=0)
    info = cache.pin(messages[:1], name="head")
    assert info.n_tokens == len(cache.template.prefix_tokens(messages[:1]))
    assert info.evaluated_tokens == 0  # all of it was live already
    fresh = open_cache()
    reply = fresh.chat(messages, max_tokens=16, temperature=0)
    assert cached(reply) >= info.n_tokens
    assert text(reply) == cold_reply(messages, max_tokens=16)
    assert cache.stats()["store_errors"] == fresh.stats()["store_errors"] == 0


def test_pin_unpin_chat_gc_in_any_order_on_two_instances_of_one_model(open_cache, cold_reply):
    first = open_cache()
    second = PrefixCache(first.llm, first.store.url)  # a second cache adopting the same Llama
    messages = ask("Do you cut timber?")
    expected = cold_reply(messages, max_tokens=12)
    steps: list[Callable[[], Any]] = [
        lambda: second.chat(messages, max_tokens=12, temperature=0),
        lambda: first.pin(messages[:1], name="a"),
        lambda: second.pin(messages[:1], name="a"),
        lambda: first.unpin("a"),
        lambda: first.store.gc(),
        lambda: second.pin(messages[:1], name="b"),
        lambda: first.chat(messages, max_tokens=12, temperature=0),
    ]
    for step in steps:
        out = step()
        if isinstance(out, dict) and "choices" in out:
            assert text(out) == expected
    assert [p.name for p in first.pins()] == ["b"]
    second.close()


# --- store failures after generation ------------------------------------------------------------

_FULL_DISK_WORKER = """
import json, resource, signal, sys
from prefixcache import PrefixCache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
cache = PrefixCache.open(store=sys.argv[1], n_ctx={n_ctx})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the disk is "full" at 1 MB
reply = cache.chat(json.loads(sys.argv[2]), max_tokens=16, temperature=0)
print(json.dumps({{"text": reply["choices"][0]["message"]["content"], "stats": cache.stats()}}))
"""


def test_a_full_disk_during_autosave_still_returns_the_reply(store: Path, cold_reply):
    messages = ask("What is a hammer for?")
    open_store(store).close()  # the store's database exists before the limit
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_FULL_DISK_WORKER.format(n_ctx=N_CTX)),
            str(store),
            json.dumps(messages),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["text"] == cold_reply(messages, max_tokens=16)
    assert out["stats"]["store_errors"] >= 1
    assert "File too large" in run.stderr or "too large" in run.stderr.lower()
    # Nothing half-written: the store opens, holds no broken segment, and works afterwards.
    after = open_store(store)
    assert after.gc().broken == 0
    stored = after.keys()
    assert all(after.get(k) is not None for k in stored)
    after.close()


def test_an_eviction_lock_timeout_during_autosave_still_returns_the_reply(
    open_cache, store, cold_reply, monkeypatch, caplog
):
    monkeypatch.setattr(lifecycle, "EVICTION_LOCK_TIMEOUT_S", 0.2)
    other = open_store(store)
    cache = open_cache(quota_gb=0.001)  # every autosave must evict
    messages = ask("When do you open?")
    with other.lock("evict"), caplog.at_level(logging.WARNING, logger="prefixcache"):
        reply = on_thread(lambda: cache.chat(messages, max_tokens=12, temperature=0))
    assert text(reply) == cold_reply(messages, max_tokens=12)
    assert cache.stats()["store_errors"] == 1
    assert "store failure while enforcing the quota" in caplog.text
    other.close()


# --- streams and threads --------------------------------------------------------------------------


def test_a_stream_advanced_on_one_thread_and_closed_on_another_frees_the_model(open_cache):
    cache = open_cache()
    stream = on_thread(lambda: cache.chat(ask("Hi"), stream=True, max_tokens=64, temperature=0))
    on_thread(lambda: next(stream))  # thread A reads a chunk
    on_thread(stream.close)  # thread B closes the stream
    reply = on_thread(lambda: cache.chat(ask("Hi"), max_tokens=4, temperature=0))  # thread C
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_stream_abandoned_mid_way_does_not_hold_the_model(open_cache, cold_reply):
    cache = open_cache()
    started, done = threading.Event(), threading.Event()
    abandoned = []

    def start_and_walk_away() -> None:
        stream = cache.chat(ask("Tell me a story."), stream=True, max_tokens=48, temperature=0)
        next(stream)
        abandoned.append(stream)  # still referenced, never read again, never closed
        started.set()
        done.wait()  # thread A stays alive (a thread id is reused once its thread ends)

    walker = threading.Thread(target=start_and_walk_away)
    walker.start()
    try:
        assert started.wait(120)
        messages = ask("What is a hammer for?")
        reply = on_thread(lambda: cache.chat(messages, max_tokens=16, temperature=0))
        assert text(reply) == cold_reply(messages, max_tokens=16)
    finally:
        done.set()
        walker.join()


def test_streamed_chunks_equal_the_cold_reply_and_carry_usage(open_cache, cold_reply):
    cache = open_cache()
    messages = ask("What is a hammer for?")
    cache.pin(messages[:1], name="hw")
    chunks = list(
        cache.chat(
            messages,
            stream=True,
            max_tokens=16,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert streamed == cold_reply(messages, max_tokens=16)
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 100


def test_a_stream_error_reaches_the_reader(open_cache):
    cache = open_cache()
    stream = cache.chat(ask("word " * 3000), stream=True, max_tokens=4)
    with pytest.raises(Exception, match="context holds"):
        next(stream)
    assert on_thread(lambda: cache.chat(ask("Hi"), max_tokens=2, temperature=0))


def test_caches_adopting_one_model_from_many_threads_share_one_lock(open_cache):
    llm = open_cache().llm
    barrier = threading.Barrier(8)
    locks = []

    def adopt() -> None:
        barrier.wait()
        locks.append(PrefixCache(llm, open_cache().store.url)._lock)

    threads = [threading.Thread(target=adopt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(lock) for lock in locks}) == 1


# --- segments llama.cpp refuses are kept ----------------------------------------------------------


def test_an_intact_segment_that_llama_cpp_refuses_is_kept_and_prefilled(
    open_cache, store, cold_reply, caplog
):
    """Only bytes failing their checksum are quarantined. A segment whose checksum holds but
    that llama.cpp will not load (here: the KV of positions 64..127 stored as 0..63) stays in
    the store for whoever can use it; this process prefills and does not try it again."""
    writer = open_cache()
    writer.segment_tokens = 64
    writer.pin([SYSTEM], name="hw")
    db = open_store(store)
    first, second = sorted((s for s in db.segments()), key=lambda s: s.start)[:2]
    buf = bytearray(second.nbytes)
    db.read_kv(second, memoryview(buf))
    db.delete(first.key)
    forged = dataclasses.replace(first, nbytes=len(buf), checksum=checksum(buf))
    db.put(forged, buf)
    cache = open_cache()
    messages = ask("What is a hammer for?")
    with caplog.at_level(logging.WARNING, logger="prefixcache"):
        reply = cache.chat(messages, max_tokens=16, temperature=0, autosave=False)
        again = cache.chat(messages, max_tokens=16, temperature=0, autosave=False)
    assert text(reply) == text(again) == cold_reply(messages, max_tokens=16)
    assert cached(reply) == 0
    assert "not restorable here" in caplog.text and "quarantined" not in caplog.text
    assert cache.stats()["refused_segments"] == 1  # tried once, not on every call
    assert cache.stats()["corrupt_segments"] == 0
    assert db.get(first.key) is not None and db.get(second.key) is not None
    db.close()


def test_a_chain_restores_up_to_the_segment_llama_cpp_refuses(open_cache, store, cold_reply):
    """Segments load in order while the next one is checked (restore.ChainLoader): a refusal
    by llama.cpp in the middle of a chain keeps what came before it and loads nothing after."""
    writer = open_cache()
    writer.segment_tokens = 64
    writer.pin([SYSTEM], name="hw")
    db = open_store(store)
    first, second, third = sorted(db.segments(), key=lambda s: s.start)[:3]
    buf = bytearray(third.nbytes)
    db.read_kv(third, memoryview(buf))
    db.delete(second.key)
    db.put(dataclasses.replace(second, nbytes=len(buf), checksum=checksum(buf)), buf)
    cache = open_cache()
    messages = ask("What is a hammer for?")
    reply = cache.chat(messages, max_tokens=16, temperature=0, autosave=False)
    assert text(reply) == cold_reply(messages, max_tokens=16)
    assert cached(reply) == first.end
    stats = cache.stats()
    assert stats["segments_restored"] == 1 and stats["refused_segments"] == 1
    assert stats["corrupt_segments"] == 0
    db.close()


# --- closing -------------------------------------------------------------------------------------


def test_close_frees_the_model_it_opened_but_not_an_adopted_one(open_cache, store):
    opened = PrefixCache.open(store=store, n_ctx=N_CTX)
    llm = opened.llm
    opened.close()
    opened.close()  # twice is harmless
    assert llm._ctx.ctx is None and llm._model.model is None
    adopted_from = open_cache()
    adopter = PrefixCache(adopted_from.llm, store)
    adopter.close()
    assert adopted_from.llm._ctx.ctx is not None
    assert adopted_from.chat(ask("Hi"), max_tokens=2, temperature=0)


def test_the_fingerprint_names_the_flash_attention_llama_cpp_chose(model_path, store):
    """A context asking for flash_attn "auto" is keyed by what llama.cpp resolved it to, so it
    shares segments with a context that asked for that mode explicitly."""
    auto = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, verbose=False)
    auto.context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    resolved = PrefixCache(auto, store).fingerprint
    assert resolved.flash_attn in (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    )
    on = resolved.flash_attn == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    explicit = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, verbose=False, flash_attn=on)
    assert PrefixCache(explicit, store).fingerprint.digest == resolved.digest
