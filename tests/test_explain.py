"""Explaining misses: where a request leaves the nearest stored prefix, and why.

The pure part (a radix index, pins and tokens in, a divergence out) is checked on hand-made
indexes; the rest on the real model: a pinned recipe-like prefix, and a request whose tool schema
gained what openai-agents adds (``strict``, ``additionalProperties``), through
``PrefixCache.explain``, a call's debug line and counters, the server's header and /metrics, and
``prefixcache explain``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
from conftest import SYSTEM
from test_cli import run  # noqa: F401  (fixture)
from test_server import MODEL_ID, TOOL, recipes, serve  # noqa: F401  (fixtures)

from prefixcache import DiskStore, Pin, PrefixCache
from prefixcache.catalog import Known
from prefixcache.explain import (
    DIVERGED,
    DIVERGED_IN_PIN,
    EMPTY,
    EXTENDS,
    FULL,
    NO_MATCH,
    RESTORE_FAILED,
    PinReader,
    diagnose,
    explain_tokens,
)
from prefixcache.radix import RadixIndex, common_prefix_length
from prefixcache.template import ChatTemplate

#: TOOL as openai-agents sends it: a strict schema that forbids other properties.
STRICT = copy.deepcopy(TOOL)
STRICT["function"]["strict"] = True
STRICT["function"]["parameters"]["additionalProperties"] = False
QUESTION = {"role": "user", "content": "How many claw hammers are in stock?"}


# --- the pure part ------------------------------------------------------------------------------


def known(*segments: tuple[str, str | None, list[int]]) -> Known:
    """An index of ``(key, parent, tokens)`` segments (no metadata: created times all equal)."""
    k = Known(RadixIndex())
    for key, parent, tokens in segments:
        k.index.insert(key, parent, tokens)
    return k


def pin(name: str, key: str, n_tokens: int, expires: float | None = None) -> Pin:
    return Pin(name=name, key=key, root="r", n_tokens=n_tokens, created=0.0, expires=expires)


BASE = list(range(100, 110))  # a 10-token pinned base
REVIEWER = BASE + list(range(200, 210))  # a 20-token pin that extends it
STORE = known(
    ("base", None, BASE),
    ("reviewer", "base", REVIEWER[10:]),
    ("chat", "base", [1, 2, 3, 4]),  # an autosaved conversation after the base
)
PINS = [pin("team-base", "base", 10), pin("team-reviewer", "reviewer", 20)]

CASES = {
    # prompt: (kind, at, of, pin)
    "full": (REVIEWER, FULL, None, None, None),
    "extends": ([*REVIEWER, 7, 7], EXTENDS, None, None, None),
    "in the reviewer pin": ([*REVIEWER[:15], 9, 9], DIVERGED_IN_PIN, 15, 20, "team-reviewer"),
    "in the base pin": ([*BASE[:4], 9], DIVERGED_IN_PIN, 4, 10, "team-base"),
    "whole base, then a conversation": ([*BASE, 1, 2, 9], DIVERGED, 12, 14, None),
    # A prompt that holds all of team-base and goes on otherwise is a team-base request: it
    # does not miss team-reviewer, which merely extends team-base.
    "whole base, then something new": ([*BASE, 9, 9], DIVERGED, 10, 20, None),
    "nothing stored starts so": ([9, 9], NO_MATCH, 0, 10, None),
}


@pytest.mark.parametrize("case", CASES)
def test_a_prompt_is_classified_by_where_it_leaves_the_stored_prefixes(case: str) -> None:
    tokens, kind, at, of, pin_name = CASES[case]
    e = explain_tokens(STORE, tokens, PINS, lambda t: " ".join(map(str, t)))
    assert (e.kind, e.diverged_at, e.prompt_tokens) == (kind, at, len(tokens))
    assert e.matched_tokens == (at if at is not None else min(len(tokens), len(REVIEWER)))
    if at is not None:
        assert e.divergence is not None
        assert (e.divergence.of, e.divergence.pin) == (of, pin_name)
    matched = [p.matched for p in e.pins]  # nearest first
    assert matched == sorted(matched, reverse=True) and len(e.pins) == 2
    # The call path agrees, and says nothing for full hits and extensions.
    d = diagnose(STORE, STORE.index.match(tokens), tokens, lambda: PINS)
    assert d == (e.divergence if kind not in (FULL, EXTENDS) else None)


def test_the_call_path_reads_no_pins_for_a_full_hit_or_an_extension() -> None:
    def pins() -> Iterable[Pin]:
        raise AssertionError("pins read on the hot path")

    for tokens in (REVIEWER, [*REVIEWER, 7], BASE[:5]):
        assert diagnose(STORE, STORE.index.match(tokens), tokens, pins) is None


def test_an_expired_pin_is_no_pin_and_an_empty_namespace_is_empty() -> None:
    tokens = [*BASE[:4], 9]
    expired = [pin("team-base", "base", 10, expires=time.time() - 1)]
    e = explain_tokens(STORE, tokens, expired, str)
    assert (e.kind, e.pins) == (DIVERGED, ())
    assert explain_tokens(known(), tokens, PINS, str).kind == EMPTY
    assert "nothing is stored" in str(explain_tokens(known(), tokens, PINS, str))


def test_pins_are_read_again_after_a_pin_here_or_a_while_after_one_elsewhere(
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path / "store")
    reader = PinReader(store, max_age=3600)
    assert reader("r") == []
    store.set_pin(pin("elsewhere", "k1", 10))  # another process: the store's generation moves
    assert reader("r") == []  # within max_age: the list read before still serves
    reader.clear()  # this process pinned
    assert [p.name for p in reader("r")] == ["elsewhere"]
    assert reader("another root") == []
    store.set_pin(pin("later", "k2", 10))
    reader.max_age = 0.0  # a while later
    assert {p.name for p in reader("r")} == {"elsewhere", "later"}
    store.close()


# --- on the real model ------------------------------------------------------------------------


def test_explain_names_the_pin_the_position_and_the_text_of_a_strict_tool_schema(
    open_cache: Callable[..., PrefixCache], caplog: pytest.LogCaptureFixture
) -> None:
    cache = open_cache()
    cache._pin_reader.max_age = 3600  # pins read for a call are read again after a pin here
    pinned = cache.pin([SYSTEM], "shop", tools=[TOOL])
    request = [SYSTEM, QUESTION]
    asked = cache.template.tokens(request, [STRICT])
    at = common_prefix_length(cache.template.prefix_tokens([SYSTEM], [TOOL]), asked)
    assert 0 < at < pinned.n_tokens

    same = cache.explain(request, tools=[TOOL])
    assert same.kind == EXTENDS and same.matched_tokens == pinned.n_tokens
    assert [(p.name, p.whole) for p in same.pins] == [("shop", True)]

    live = cache.kv.live_tokens()
    e = cache.explain(request, tools=[STRICT])
    assert cache.kv.live_tokens() == live  # no model work
    assert e.kind == DIVERGED_IN_PIN
    assert (e.prompt_tokens, e.matched_tokens, e.diverged_at) == (len(asked), at, at)
    assert e.pin is not None and (e.pin.name, e.pin.n_tokens, e.pin.matched) == (
        "shop",
        pinned.n_tokens,
        at,
    )
    # The text on both sides: the stored schema goes on with its properties, the request's
    # with what the framework added.
    assert e.before.endswith('"parameters": {"')
    assert e.stored_after.startswith("properties")
    assert e.request_after.startswith("additionalProperties")
    assert len(e.before) <= 40 and len(e.stored_after) <= 40
    assert f"pin 'shop' at token {at} of its {pinned.n_tokens}" in str(e)
    assert "additionalProperties" in e.reason and "\n" not in e.reason
    # The same request as an OpenAI body, as `prefixcache explain --request` passes it.
    body = {"model": "shop", "messages": request, "tools": [STRICT], "max_tokens": 8}
    assert cache.explain(**body) == e

    # A call with that request: the restore stops there, says so in a debug line, counts it,
    # and a stream tells it with its first chunk.
    caplog.set_level(logging.DEBUG, logger="prefixcache.explain")
    stream = cache.chat(request, tools=[STRICT], max_tokens=2, stream=True, autosave=False)
    next(stream)
    stream.close()
    assert stream.prepared is not None and stream.prepared.diverged == e.divergence
    assert stream.prepared.cached_tokens <= at
    line = next(r.getMessage() for r in caplog.records if r.name == "prefixcache.explain")
    assert f"leaves pin 'shop' at token {at} of {pinned.n_tokens}" in line
    assert "additionalProperties" in line and "properties" in line
    assert cache.stats()["partial_restores"][DIVERGED_IN_PIN] == 1
    caplog.clear()
    cache.chat(request, tools=[TOOL], max_tokens=2, autosave=False)  # a hit: nothing to say
    assert not [r for r in caplog.records if r.name == "prefixcache.explain"]
    assert cache.stats()["partial_restores"][DIVERGED_IN_PIN] == 1
    # Unpinned, the same prefix is an ordinary stored one: the next call knows at once.
    cache.unpin("shop")
    cache.chat(request, tools=[STRICT], max_tokens=2, autosave=False)
    assert cache.stats()["partial_restores"] == {
        DIVERGED_IN_PIN: 1,
        DIVERGED: 1,
        NO_MATCH: 0,
        RESTORE_FAILED: 0,
    }


def test_a_recipe_written_as_the_framework_sends_its_tools_matches_whole(
    open_cache: Callable[..., PrefixCache],
) -> None:
    cache = open_cache()
    cache.pin([SYSTEM], "shop-agents", tools=[STRICT])
    e = cache.explain([SYSTEM, QUESTION], tools=[STRICT])
    assert e.kind == EXTENDS and e.pins[0].whole and e.divergence is None
    reply = cache.chat([SYSTEM, QUESTION], tools=[STRICT], max_tokens=2)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= e.pins[0].n_tokens


def test_a_segment_that_cannot_be_restored_is_a_restore_failure(
    open_cache: Callable[..., PrefixCache], store: Path
) -> None:
    open_cache().pin([SYSTEM], "shop", tools=[TOOL])
    (path,) = [p for p in store.rglob("*.val") if p.stat().st_size > 100_000]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = open_cache()
    stream = cache.chat([SYSTEM, QUESTION], tools=[TOOL], max_tokens=2, stream=True)
    next(stream)
    stream.close()
    assert stream.prepared is not None and stream.prepared.diverged is not None
    assert stream.prepared.diverged.kind == RESTORE_FAILED
    assert stream.prepared.diverged.at == 0 < stream.prepared.diverged.of
    assert cache.stats()["partial_restores"][RESTORE_FAILED] == 1


# --- the server and the CLI ---------------------------------------------------------------------

DIVERGED_RE = re.compile(r"pin=shop; at=(\d+); of=(\d+)")


def test_the_server_names_the_pin_a_request_leaves_in_a_header_and_counts_it(
    serve: Callable[..., Any],  # noqa: F811
    cold_llm: llama_cpp.Llama,
) -> None:
    served = serve()
    template = ChatTemplate(cold_llm)
    pin_tokens = template.prefix_tokens([SYSTEM], [TOOL])
    titled = copy.deepcopy(TOOL)
    titled["function"]["parameters"]["properties"]["sku"]["title"] = "Sku"

    def post(tools: list[dict[str, Any]], stream: bool) -> httpx.Response:
        body = {
            "model": "shop",
            "messages": [SYSTEM, QUESTION],
            "tools": tools,
            "max_tokens": 2,
            "temperature": 0,
            "stream": stream,
        }
        r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r

    for tools, stream in (([STRICT], True), ([titled], False)):
        r = post(tools, stream)
        found = DIVERGED_RE.fullmatch(r.headers.get("x-prefixcache-diverged", ""))
        assert found, r.headers
        asked = template.tokens([SYSTEM, QUESTION], tools)
        assert int(found[1]) == common_prefix_length(pin_tokens, asked)
        assert int(found[2]) == len(pin_tokens)
    # The request was autosaved: the same again restores all of it, and says nothing.
    assert "x-prefixcache-diverged" not in post([titled], False).headers
    assert "x-prefixcache-diverged" not in post([TOOL], False).headers
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    assert (
        f'prefixcache_partial_restores_total{{model="{MODEL_ID}",reason="diverged_in_pin"}} 2.0'
        in metrics
    )


def test_prefixcache_explain_prints_the_pin_the_position_and_the_text(
    run: Callable[..., Any],  # noqa: F811
    recipes: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    run("prewarm", recipes)
    same = run("explain", recipes / "shop.yaml", "-m", QUESTION["content"]).stdout
    assert "whole" in same and "extends" in same

    request = tmp_path / "request.json"
    request.write_text(
        json.dumps({"model": "shop", "messages": [SYSTEM, QUESTION], "tools": [STRICT]})
    )
    out = run("explain", "--request", request).stdout
    at = re.search(r"leaves\s+pin shop at token (\d+) of (\d+)", out)
    assert at, out
    assert "additionalProperties" in out and "diverged_in_pin" in out
    assert run("explain", "--request", "-", input=request.read_text()).stdout == out
    data = json.loads(run("explain", "--request", request, "--json").stdout)
    assert (data["kind"], data["diverged_at"]) == (DIVERGED_IN_PIN, int(at[1]))
    assert data["divergence"]["pin"] == "shop" and data["divergence"]["of"] == int(at[2])

    missing = run("explain", code=1)
    assert "give a recipe, or a request" in missing.output
