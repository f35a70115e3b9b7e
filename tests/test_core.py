"""Greedy output with a restored prefix equals a cold run, on the real SmolLM2 model."""

from __future__ import annotations

import llama_cpp
import pytest

from prefixcache import PrefixCache, config

SYSTEM = {
    "role": "system",
    "content": "You are a terse assistant for a hardware store. " + "Be helpful and short. " * 30,
}


@pytest.fixture(scope="module")
def cold_llm() -> llama_cpp.Llama:
    return llama_cpp.Llama(
        str(config.default_model()), n_ctx=2048, verbose=False, chat_format="chat_template.default"
    )


def cold_reply(llm: llama_cpp.Llama, messages: list[dict]) -> str:
    llm.reset()
    out = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0)
    return out["choices"][0]["message"]["content"]


def test_pinned_and_autosaved_prefixes_give_cold_output(tmp_path, cold_llm):
    store = tmp_path / "store"
    info = PrefixCache.open(store=store, n_ctx=2048).pin([SYSTEM], name="hw")
    first = [SYSTEM, {"role": "user", "content": "What is a hammer for?"}]
    warm = PrefixCache.open(store=store, n_ctx=2048)
    reply = warm.chat(first, max_tokens=24, temperature=0)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == info.n_tokens
    assert reply["choices"][0]["message"]["content"] == cold_reply(cold_llm, first)
    second = [*first, reply["choices"][0]["message"], {"role": "user", "content": "And a saw?"}]
    fresh = PrefixCache.open(store=store, n_ctx=2048)
    reply2 = fresh.chat(second, max_tokens=24, temperature=0)
    cached = reply2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= reply["usage"]["prompt_tokens"]
    assert reply2["choices"][0]["message"]["content"] == cold_reply(cold_llm, second)
