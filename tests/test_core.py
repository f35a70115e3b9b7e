"""The runtime on the real SmolLM2 model: restored prefixes give exactly the cold run's output."""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from conftest import N_CTX, SYSTEM, ask, cached, text

from prefixcache import (
    IncompatibleStateError,
    PrefixCache,
    PrefixCacheError,
    PromptTooLongError,
    open_store,
)
from prefixcache.cache import SPLIT_MIN_TOKENS
from prefixcache.radix import common_prefix_length


def test_pinned_prefix_restores_in_a_fresh_cache_and_matches_cold_output(open_cache, cold_reply):
    info = open_cache().pin([SYSTEM], name="hw")
    assert info.evaluated_tokens == info.n_tokens > 100
    warm = open_cache()  # a new Llama: the KV can only come from the store
    reply = warm.chat(ask("What is a hammer for?"), max_tokens=24, temperature=0)
    assert cached(reply) == info.n_tokens
    assert text(reply) == cold_reply(ask("What is a hammer for?"))
    assert warm.stats()["hits"] == 1


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """The logits the first reply token was sampled from (max_tokens=1 evaluates no more)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def test_logits_are_bit_identical_to_cold_at_every_batch_boundary(open_cache, model_path):
    """llama.cpp computes a token alone (a micro-batch of one) slightly differently from the
    same token beside others. With 16-token micro-batches, prompts of 20 consecutive lengths put
    every residue at the pin's end, the restore point and the prompt's end; each is asked twice
    (the second time it is all stored). The logits must equal a cold run's, bit for bit."""
    unit = 16
    cold = llama_cpp.Llama(
        str(model_path),
        n_ctx=N_CTX,
        n_batch=unit,
        n_ubatch=unit,
        verbose=False,
        chat_format="chat_template.default",
    )
    cache = open_cache(n_batch=unit, n_ubatch=unit)
    # A pin whose length is one past a multiple of the micro-batch: evaluated without a batch
    # of one, as every stored span is.
    for j in range(unit):
        system = {"role": "system", "content": "Be terse." + " ok" * j}
        if len(cache.template.prefix_tokens([system])) % unit == 1:
            break
    else:
        pytest.fail("no system prompt of the wanted length")
    cache.pin([system], name="terse")
    differ = []
    dropped = []
    for k in range(20):
        messages = [system, {"role": "user", "content": "Tell me about " + "oak " * k}]
        for attempt in ("first", "repeat"):
            # What the call can reuse: the stored match, or the live KV of the previous call.
            tokens = cache.template.tokens(messages, None)
            live = common_prefix_length(cache.kv.live_tokens(), tokens)
            usable = min(max(cache.lookup(tokens).length, live), len(tokens) - 1)
            # (Nothing prefilled ahead afterwards: it would overwrite the logits read here.)
            reply = cache.chat(messages, max_tokens=1, temperature=0, prefill_replies=False)
            # At most one token is given back (so that no batch of one is left before the end).
            if cached(reply) < usable - 1:
                dropped.append((k, attempt, len(tokens), usable, cached(reply)))
            warm = last_logits(cache.llm)
            cold.reset()
            cold.create_chat_completion(messages=messages, max_tokens=1, temperature=0)
            if not np.array_equal(warm, last_logits(cold)):
                differ.append((k, attempt, cache.llm.n_tokens))
    assert not differ, f"logits differ from the cold run's for (k, attempt, prompt tokens) {differ}"
    assert not dropped, f"restores dropped for (k, attempt, prompt, usable, cached) {dropped}"


def test_pinning_again_evaluates_nothing(open_cache):
    first = open_cache().pin([SYSTEM], name="hw")
    again = open_cache().pin([SYSTEM], name="hw")
    assert again.evaluated_tokens == 0 and again.new_segments == 0
    assert again.key == first.key


def test_autosaved_turn_restores_the_previous_prompt_and_matches_cold(open_cache, cold_reply):
    open_cache().pin([SYSTEM], name="hw")
    turn1 = ask("Do you cut timber?")
    reply1 = open_cache().chat(turn1, max_tokens=24, temperature=0)
    turn2 = [*turn1, reply1["choices"][0]["message"], {"role": "user", "content": "How long?"}]
    reply2 = open_cache().chat(turn2, max_tokens=24, temperature=0)
    assert cached(reply2) >= reply1["usage"]["prompt_tokens"]
    assert text(reply2) == cold_reply(turn2)


def test_branches_share_the_pinned_segment(open_cache, cold_reply, store):
    cache = open_cache()
    info = cache.pin([SYSTEM], name="hw")
    pinned_bytes = open_store(store).total_bytes()
    for question in ("What paint do you sell?", "Are you open on Sunday?"):
        # (Only the questions: the replies prefilled ahead for a next turn would be stored too.)
        reply = open_cache().chat(
            ask(question), max_tokens=16, temperature=0, prefill_replies=False
        )
        assert cached(reply) >= info.n_tokens  # the second also shares "user\n" of the first
        assert text(reply) == cold_reply(ask(question), max_tokens=16)
    # Each branch stored only its own question, not another copy of the system prompt.
    grown = open_store(store).total_bytes() - pinned_bytes
    per_token = pinned_bytes / info.n_tokens
    assert 0 < grown < 2 * 20 * per_token


def test_conversations_that_differ_in_their_last_message_store_the_rest_once(
    open_cache, cold_reply, store
):
    questions = ("What paint do you sell?", "Are you open on Sunday?")
    for question in questions:
        reply = open_cache().chat(ask(question), max_tokens=4, temperature=0, prefill_replies=False)
        assert text(reply) == cold_reply(ask(question), max_tokens=4)
    first, second = (open_cache().template.tokens(ask(q)) for q in questions)
    s = open_store(store)
    segments = [s.get(key) for key in sorted(s.keys())]
    # Autosave ended a segment where the question begins, so the second call chained from it
    # instead of storing the system prompt again.
    assert sum(seg.start == 0 for seg in segments) == 1
    # Past the cut the two questions share a few tokens ("user\n"); a branch that short is not
    # split off (SPLIT_MIN_TOKENS), so only those are stored twice.
    unique = len(first) + len(second) - common_prefix_length(first, second)
    stored = sum(len(seg.tokens) for seg in segments)
    assert unique <= stored < unique + SPLIT_MIN_TOKENS


def test_a_repeated_chat_stores_nothing_and_renders_no_cut(open_cache, monkeypatch):
    cache = open_cache()
    renders = []
    turn_start = cache.template.turn_start

    def counting(*args, **kwargs):
        renders.append(1)
        return turn_start(*args, **kwargs)

    monkeypatch.setattr(cache.template, "turn_start", counting)
    cache.chat(ask("Do you sell brushes?"), max_tokens=2, temperature=0, prefill_replies=False)
    assert len(renders) == 1  # the first call stored its prompt, cut where the question begins
    cache.chat(ask("Do you sell brushes?"), max_tokens=2, temperature=0, prefill_replies=False)
    assert len(renders) == 1  # all of it was stored already: no render of the conversation


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_tokenizes_its_prompt_once(open_cache, cold_reply, monkeypatch, stream):
    cache = open_cache()
    texts = []
    tokenize = cache.llm.tokenize

    def counting(text, *args, **kwargs):
        texts.append(text)
        return tokenize(text, *args, **kwargs)

    monkeypatch.setattr(cache.llm, "tokenize", counting)
    question = ask("Do you deliver paint on Saturdays?")
    reply = cache.chat(question, max_tokens=4, temperature=0, stream=stream)
    if stream:
        reply = {
            "choices": [
                {
                    "message": {
                        "content": "".join(
                            c["choices"][0]["delta"].get("content") or "" for c in reply
                        )
                    }
                }
            ]
        }
    assert text(reply) == cold_reply(question, max_tokens=4)
    prompt = cache.template.render(question).encode("utf-8")
    assert texts.count(prompt) == 1  # for the restore; the chat handler got those tokens


def test_match_ending_inside_a_segment_restores_and_trims(open_cache, cold_reply):
    long_question = "Please compare these woods for a garden bench: " + "oak, pine, cedar, " * 30
    open_cache().chat(ask(long_question + "Which lasts longest?"), max_tokens=4, temperature=0)
    variant = ask(long_question + "Which is cheapest?")
    cache = open_cache()
    tokens = cache.template.tokens(variant)
    match = cache.lookup(tokens)
    assert match.chain_end > match.length > 150  # the stored segment runs past the divergence
    reply = cache.chat(variant, max_tokens=24, temperature=0)
    assert cached(reply) == match.length
    assert text(reply) == cold_reply(variant)


def test_streaming_matches_and_reports_usage(open_cache, cold_reply):
    open_cache().pin([SYSTEM], name="hw")
    chunks = list(
        open_cache().chat(
            ask("Do you sell screws?"),
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == cold_reply(ask("Do you sell screws?"))
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 100


def test_prepare_lets_a_plain_create_chat_completion_skip_the_prefix(open_cache, cold_reply):
    open_cache().pin([SYSTEM], name="hw")
    cache = open_cache()
    messages = ask("What garden supplies do you have?")
    prepared = cache.prepare(messages)
    assert cache.llm.n_tokens == prepared.cached_tokens > 100
    out = cache.llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0)
    assert text(out) == cold_reply(messages)


def test_adopts_an_existing_single_sequence_llama(model_path, store, cold_reply):
    llm = llama_cpp.Llama(
        str(model_path), n_ctx=N_CTX, verbose=False, chat_format="chat_template.default"
    )
    assert llama_cpp.llama_n_seq_max(llm._ctx.ctx) == 1
    cache = PrefixCache(llm=llm, store=store)
    cache.pin([SYSTEM], name="hw")
    reply = PrefixCache(llm=llm, store=store).chat(ask("Hi!"), max_tokens=16, temperature=0)
    assert cached(reply) > 100
    assert text(reply) == cold_reply(ask("Hi!"), max_tokens=16)


def test_prompt_over_the_context_is_an_error_not_an_abort(open_cache):
    cache = open_cache(n_ctx=256)
    with pytest.raises(PromptTooLongError, match="context holds 256"):
        cache.chat(ask("word " * 400), max_tokens=8)
    with pytest.raises(PromptTooLongError):
        cache.pin([{"role": "system", "content": "word " * 400}], name="big")
    with pytest.raises(PromptTooLongError):
        cache.chat(ask("short"), max_tokens=250)
    with pytest.raises(PrefixCacheError, match="outside the vocabulary"):
        cache.kv.validate([1, 2, 10**7])
    assert cache.chat(ask("short"), max_tokens=4)["usage"]["completion_tokens"] > 0


def test_other_kv_settings_never_restore_and_name_the_field(open_cache, caplog):
    cache = open_cache()
    cache.pin([SYSTEM], name="hw")
    other = open_cache(type_k=llama_cpp.GGML_TYPE_Q8_0)
    with caplog.at_level(logging.WARNING, logger="prefixcache"):
        reply = other.chat(ask("Hi"), max_tokens=4, temperature=0)
    assert cached(reply) == 0
    assert "type_k" in caplog.text
    with pytest.raises(IncompatibleStateError, match="type_k") as err:
        other.check_compatible(cache.fingerprint.digest)
    assert err.value.field == "type_k"


def test_namespaces_do_not_see_each_other(open_cache):
    open_cache(namespace="tenant-a").pin([SYSTEM], name="hw")
    reply = open_cache(namespace="tenant-b").chat(ask("Hi"), max_tokens=4, temperature=0)
    assert cached(reply) == 0


def test_restore_maps_the_store_and_records_hits_after_the_first_token(
    open_cache, cold_reply, store
):
    info = open_cache().pin([SYSTEM], name="hw")
    warm = open_cache()
    usage = open_store(store).usage
    chunks = iter(
        warm.chat(ask("What is a hammer for?"), stream=True, max_tokens=24, temperature=0)
    )
    reply = next(chunks)["choices"][0]["delta"].get("content", "")
    # The segment came from its mapped file (the read buffer was never needed), and its hit is
    # recorded once the reply is made, not on the way to the first token.
    assert warm.stats()["restored_tokens"] == info.n_tokens and len(warm.kv._buffer) == 0
    assert info.key not in usage()
    reply += "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert reply == cold_reply(ask("What is a hammer for?"))
    assert usage()[info.key].hits == 1


def test_a_mapped_chain_stops_at_its_corrupt_segment(open_cache, cold_reply, store):
    """Each segment is checked before llama.cpp sees it: a corrupt one in the middle of a chain
    is quarantined, the segments before it stay restored and the rest is prefilled."""
    writer = open_cache()
    writer.segment_tokens = 64
    info = writer.pin([SYSTEM], name="hw")
    db = open_store(store)
    first, middle, *_ = sorted(db.segments(), key=lambda s: s.start)
    messages = ask("What is a hammer for?")
    whole = open_cache().chat(messages, max_tokens=16, temperature=0, autosave=False)
    assert cached(whole) == info.n_tokens
    assert text(whole) == cold_reply(messages, max_tokens=16)
    data = bytearray(middle.nbytes)
    db.read_kv(middle, memoryview(data))
    (path,) = [p for p in _kv_files(store) if p.read_bytes() == data]
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = open_cache()
    reply = cache.chat(messages, max_tokens=16, temperature=0, autosave=False)
    assert 0 < cached(reply) <= middle.start == first.end
    assert text(reply) == cold_reply(messages, max_tokens=16)
    assert cache.stats()["corrupt_segments"] == 1
    assert db.get(middle.key) is None and db.get(first.key) is not None
    db.close()


def test_live_kv_of_another_namespace_is_not_reused(open_cache, store):
    tenant_a = open_cache(namespace="tenant-a")
    tenant_b = PrefixCache(llm=tenant_a.llm, store=store, namespace="tenant-b")  # one model
    secret = ask("My locker code is 4471. " * 8 + "Can you remember it?")
    tenant_a.chat(secret, max_tokens=4, temperature=0)
    assert tenant_a.llm.n_tokens > 100  # A's conversation is live in the shared context
    assert cached(tenant_b.chat(secret, max_tokens=4, temperature=0)) == 0
    # A still gets its own prefix back, from its own namespace in the store.
    assert cached(tenant_a.chat(secret, max_tokens=4, temperature=0)) > 100


def _kv_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*.val") if p.stat().st_size > 100_000]


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_segment_falls_back_to_prefill(open_cache, cold_reply, store, damage, caplog):
    info = open_cache().pin([SYSTEM], name="hw")
    (path,) = _kv_files(store)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 3 :]
    else:
        data += b"\0" * 4096
    path.write_bytes(bytes(data))
    cache = open_cache()
    with caplog.at_level(logging.WARNING, logger="prefixcache"):
        reply = cache.chat(ask("What is a hammer for?"), max_tokens=24, temperature=0)
    assert cached(reply) == 0
    assert text(reply) == cold_reply(ask("What is a hammer for?"))
    assert "corrupt" in caplog.text and "quarantined" in caplog.text
    assert cache.stats()["corrupt_segments"] == 1
    # The damaged bytes were quarantined; autosave then stored the system prompt again from this
    # call's own prefill (a segment ends where the question begins), and that copy restores.
    again = open_store(store).get(info.key)
    assert again is not None and again.label == "autosave"
    reply = open_cache().chat(ask("What is a hammer for?"), max_tokens=24, temperature=0)
    assert cached(reply) >= info.n_tokens
    assert text(reply) == cold_reply(ask("What is a hammer for?"))
