"""Replies prefilled ahead (prefixcache.ahead) on the real SmolLM2 model.

After a chat call, the next turn's prefix (the conversation with the reply, up to where the next
message starts) is prefilled in the background: the next turn restores through the reply and its
output is still the cold run's, token for token; a call that wants the model gets it back within a
micro-batch, and what was done is kept; the server does it only while the model's queue is empty.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from conftest import N_CTX, TOOL, cached, text

from prefixcache import PrefixCache
from prefixcache.config import resolve_model
from prefixcache.server.core import Server, ServerConfig
from prefixcache.server.worker import ModelWorker, collect_call

SHORT = {"role": "system", "content": "You are the terse assistant of a hardware store."}


def turn(question: str) -> list[dict[str, Any]]:
    return [SHORT, {"role": "user", "content": question}]


def test_the_next_turn_restores_through_the_reply_from_the_store_and_matches_cold(
    open_cache, cold_reply
):
    cache = open_cache()
    first = turn("Name three kinds of screws.")
    reply = cache.chat(first, max_tokens=24, temperature=0)
    message = reply["choices"][0]["message"]
    assert cache.idle(timeout=300)
    prompt = reply["usage"]["prompt_tokens"]
    prefix = cache.template.prefix_tokens([*first, message])
    assert len(prefix) > prompt + 10  # the reply is in it
    stats = cache.stats()
    assert stats["reply_prefill_tokens"] >= len(prefix) - prompt
    assert stats["reply_prefill_runs"] == 1 and stats["reply_prefill_seconds"] > 0
    assert cache.lookup(prefix).length == len(prefix)  # stored as autosave stores
    # A fresh process: the reply's KV can only come from the store.
    second = [*first, message, {"role": "user", "content": "Which one is for oak?"}]
    again = open_cache().chat(second, max_tokens=24, temperature=0, prefill_replies=False)
    assert cached(again) >= len(prefix) - 1
    assert text(again) == cold_reply(second)


def test_a_tool_call_reply_is_prefilled_as_the_template_renders_it_and_matches_cold(
    open_cache, cold_reply
):
    cache = open_cache()
    first = turn("How many H-200 hammers are in stock?")
    reply = cache.chat(
        first,
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
        temperature=0,
    )
    message = reply["choices"][0]["message"]
    (call,) = message["tool_calls"]
    assert cache.idle(timeout=300)
    prefix = cache.template.prefix_tokens([*first, message], [TOOL])
    rendered = cache.template.detokenize(prefix[reply["usage"]["prompt_tokens"] :])
    assert call["function"]["name"] in rendered and "<|im_end|>" in rendered
    second = [*first, message, {"role": "tool", "tool_call_id": call["id"], "content": "14"}]
    again = cache.chat(
        second,
        tools=[TOOL],
        tool_choice="none",
        max_tokens=24,
        temperature=0,
        prefill_replies=False,
    )
    assert cached(again) >= len(prefix) - 1
    msgs, tools = cache.template.messages_for(second, [TOOL])
    assert text(again) == cold_reply(msgs, tools=tools)
    stats = cache.stats()
    assert stats["reply_prefill_reused_tokens"] == stats["reply_prefill_tokens"] > 0
    assert stats["reply_prefill_saved_s"] > 0


def test_a_call_takes_the_model_back_within_a_micro_batch_and_the_work_is_kept(open_cache):
    unit = 32
    cache = open_cache(n_batch=unit, n_ubatch=unit)
    first = turn("Describe the timber we sell.")
    reply = {
        "role": "assistant",
        "content": "Oak beams are strong and pine planks are light. " * 40,
    }
    n = cache.prefill_ahead(first, reply)
    assert n > 12 * unit
    deadline = time.monotonic() + 300
    while cache.stats()["reply_prefill_tokens"] < 2 * unit:  # under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    asked = time.perf_counter()
    with cache._lock:  # what every call takes first
        waited = time.perf_counter() - asked
        stats = cache.stats()
        done = stats["reply_prefill_tokens"]
        live = cache.llm.n_tokens
        stored = cache.lookup(cache.template.prefix_tokens([*first, reply])).length
    per_batch = stats["reply_prefill_seconds"] / done * unit
    # At most the micro-batch in flight (and storing what was done), never the rest of the
    # reply: that would take (n - done) / unit >= 10 micro-batches.
    assert waited < 2.5 * per_batch + 0.2, (waited, per_batch)
    assert stats["reply_prefill_preempted"] == 1 and stats["reply_prefill_runs"] == 0
    assert done < n - 8 * unit
    assert live == stored == done  # kept live and stored
    # Once the model is free the rest is done, from where it stopped: nothing twice.
    assert cache.idle(timeout=300)
    stats = cache.stats()
    assert stats["reply_prefill_runs"] == 1 and stats["reply_prefill_tokens"] == n
    assert cache.lookup(cache.template.prefix_tokens([*first, reply])).length == n


def test_one_shot_calls_and_prefill_replies_false_prefill_nothing(open_cache):
    cache = open_cache()
    cache.chat(turn("Hi"), max_tokens=4, temperature=0, prefill_replies=False)
    cache.complete("The hardware store sells", max_tokens=4, temperature=0)
    assert cache.idle(timeout=0)
    stats = cache.stats()
    assert stats["reply_prefill_tokens"] == stats["reply_prefill_runs"] == 0


def test_a_cache_opened_without_reply_prefill_prefills_nothing(store):
    # As `prefixcache serve --no-prefill-replies` opens its models.
    server = Server(ServerConfig(store=str(store), n_ctx=N_CTX, prefill_replies=False))
    try:
        cache = server._worker_for(resolve_model(None), []).cache
        cache.chat(turn("Hi"), max_tokens=4, temperature=0)
        assert cache.idle(timeout=0)
        assert cache.stats()["reply_prefill_runs"] == 0
        cache.chat(turn("Hi"), max_tokens=4, temperature=0, prefill_replies=True)
        assert cache.idle(timeout=300)
        assert cache.stats()["reply_prefill_runs"] == 1  # the call's own choice still counts
    finally:
        server.close()


def test_the_server_prefills_a_reply_only_when_the_models_queue_is_empty(open_cache):
    cache = open_cache()
    worker = ModelWorker("smol", cache, max_queue=4)
    release = threading.Event()
    first = turn("Do you cut timber to size?")

    def ask(messages: list[dict[str, Any]]) -> Any:
        return lambda: cache.chat(
            messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=16,
            temperature=0,
        )

    async def first_call() -> tuple[dict[str, Any], Any]:
        # As the server runs a request: streamed on the model's thread, assembled at its end.
        call = asyncio.ensure_future(collect_call(worker, ask(first)))
        await asyncio.sleep(0.05)  # the request is queued (or running)
        blocker = worker.submit(release.wait)  # and another one behind it
        return await call, blocker

    try:
        reply, blocker = asyncio.run(first_call())
        assert not cache.idle(timeout=1.0)  # the reply waits while the queue is not empty
        assert cache.stats()["reply_prefill_tokens"] == 0
        release.set()
        blocker.result(timeout=10)
        assert cache.idle(timeout=300)
        assert cache.stats()["reply_prefill_runs"] == 1
        message = reply["choices"][0]["message"]
        prefix = cache.template.prefix_tokens([*first, message])
        second = [*first, message, {"role": "user", "content": "How much does it cost?"}]
        again = asyncio.run(collect_call(worker, ask(second)))
        assert cached(again) >= len(prefix) - 1
    finally:
        release.set()
        worker.close()


def test_closing_the_llama_under_another_caches_prefill_stops_it_first(open_cache, store):
    unit = 32
    owner = open_cache(n_batch=unit, n_ubatch=unit)
    other = PrefixCache(llm=owner.llm, store=store, namespace="other")  # the same Llama
    reply = {"role": "assistant", "content": "Pine planks are light. " * 30}
    other.prefill_ahead(turn("Describe the timber we sell."), reply)
    deadline = time.monotonic() + 300
    while other.stats()["reply_prefill_tokens"] < unit:  # under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    owner.close()  # frees the Llama: waits for the micro-batch, and nothing runs on it after
    assert other.idle(timeout=30)
    assert other.stats()["reply_prefill_runs"] == 0
    other.close()
