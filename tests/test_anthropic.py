"""Anthropic's Messages API on ``prefixcache serve``, driven by the official ``anthropic`` SDK.

One real server (the console command on SmolLM2 and a temporary store) serves the module; each
test speaks as a tenant of its own (an API key each), so no test restores another's prefixes.
The server runs with ``$PREFIXCACHE_CACHE_TTL_SCALE`` = 0.01, so a 5-minute breakpoint lasts 3 s.
Expected token counts come from the model's chat template, rendered here on the conversation in
OpenAI's shape; replies are compared with a cold llama.cpp run's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import llama_cpp
import pytest
from conftest import N_CTX

from prefixcache.errors import PromptTooLongError
from prefixcache.lifecycle import enforce_quota, pinned_keys
from prefixcache.radix import common_prefix_length
from prefixcache.server.anthropic_schema import parse_messages_request
from prefixcache.server.messages import MAX_BODY_BYTES, anthropic_error
from prefixcache.server.schema import Overloaded
from prefixcache.store import open_store
from prefixcache.template import ChatTemplate

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
KEYS = [f"tenant-{i}" for i in range(9)]
TTL_SCALE = 0.01  # 5m -> 3 s, 1h -> 36 s
SYSTEM = (
    "You are a terse assistant for a hardware store called Bolt & Board. Answer in one sentence. "
    "Opening hours are 8am to 6pm, Monday to Saturday. We cut timber to size."
)
TOOL = {
    "name": "stock_level",
    "description": "How many units of a product are in stock.",
    "input_schema": {
        "type": "object",
        "properties": {"sku": {"type": "string", "enum": ["HM-1", "SAW-2"]}},
        "required": ["sku"],
    },
}
GREEDY = {"temperature": 0}  # the SDK no longer has a temperature argument: sent as extra_body


class Served:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path, store: Path):
        self.url, self.proc, self.log, self.store = url, proc, log, store

    def client(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)

    def post(self, body: Any, key: str = KEYS[0], path: str = "/v1/messages") -> httpx.Response:
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("anthropic")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    store = tmp / "store"
    cmd = [sys.executable, "-m", "prefixcache", "--store", str(store), "--n-ctx", str(N_CTX)]
    cmd += ["serve", "--port", str(port)]
    for key in KEYS:
        cmd += ["--api-key", key]
    log = tmp / "server.log"
    env = {**os.environ, "PREFIXCACHE_CACHE_TTL_SCALE": str(TTL_SCALE)}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(f"http://127.0.0.1:{port}", proc, log, store)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited:\n{log.read_text()}"
        try:
            if httpx.get(served.url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
        time.sleep(0.2)
    yield served
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def template(cold_llm: llama_cpp.Llama) -> ChatTemplate:
    return ChatTemplate(cold_llm)


def _system(ttl: str = "5m", text: str = SYSTEM) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}]


def _chat(question: str, system: str = SYSTEM) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape, as the server renders it."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def _usage(usage: Any) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
    }


def test_the_first_call_writes_the_breakpoint_and_the_second_reads_it(
    served: Served, template: ChatTemplate, cold_reply: Callable[..., str]
) -> None:
    client = served.client(KEYS[1])
    first_q, second_q = "Do you cut timber?", "Are you open on Sundays?"
    tokens1 = template.tokens(_chat(first_q))
    tokens2 = template.tokens(_chat(second_q))
    pinned = len(template.prefix_tokens(_chat(first_q)[:1]))  # the system message's boundary

    first = client.messages.create(
        model=MODEL_ID,
        max_tokens=8,
        system=_system("1h"),
        messages=[{"role": "user", "content": first_q}],
        extra_body=GREEDY,
    )
    assert _usage(first.usage) == {
        "input_tokens": len(tokens1) - pinned,
        "cache_creation_input_tokens": pinned,
        "cache_read_input_tokens": 0,
    }
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == pinned
    assert first.content[0].type == "text"
    assert first.content[0].text == cold_reply(_chat(first_q), max_tokens=8)

    second = client.messages.create(
        model=MODEL_ID,
        max_tokens=8,
        system=_system("1h"),
        messages=[{"role": "user", "content": second_q}],
        extra_body=GREEDY,
    )
    # Read: the breakpoint's prefix and what follows it that the first prompt shares.
    read = common_prefix_length(tokens1, tokens2)
    assert read > pinned
    assert _usage(second.usage) == {
        "input_tokens": len(tokens2) - read,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": read,
    }
    assert second.content[0].type == "text"
    assert second.content[0].text == cold_reply(_chat(second_q), max_tokens=8)

    counted = client.messages.count_tokens(
        model=MODEL_ID, system=SYSTEM, messages=[{"role": "user", "content": second_q}]
    )
    assert counted.input_tokens == len(tokens2)
    metrics = httpx.get(served.url + "/metrics", headers={"authorization": "Bearer " + KEYS[1]})
    line = f'prefixcache_api_cache_write_tokens_total{{api="/v1/messages",model="{MODEL_ID}"}}'
    assert any(row.startswith(line) for row in metrics.text.splitlines()), metrics.text


def test_a_streamed_tool_use_block_is_assembled_by_the_sdk(served: Served) -> None:
    client = served.client(KEYS[2])
    ask: dict[str, Any] = {
        "model": MODEL_ID,
        "max_tokens": 24,
        "tools": [TOOL],
        "tool_choice": {"type": "tool", "name": "stock_level"},
        "messages": [{"role": "user", "content": "How many hammers are in stock?"}],
        "extra_body": GREEDY,
    }
    with client.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    assert "input_json" in kinds  # the arguments came in pieces
    assert streamed.stop_reason == "tool_use"
    [block] = streamed.content
    assert block.type == "tool_use" and block.name == "stock_level"
    assert block.input in ({"sku": "HM-1"}, {"sku": "SAW-2"})
    whole = client.messages.create(**ask)
    assert [b.model_dump(exclude={"id"}) for b in whole.content] == [
        b.model_dump(exclude={"id"}) for b in streamed.content
    ]
    assert whole.stop_reason == "tool_use"


def test_a_tool_loop_answers_from_the_tool_result(
    served: Served, template: ChatTemplate, cold_reply: Callable[..., str]
) -> None:
    client = served.client(KEYS[3])
    question = {"role": "user", "content": "How many hammers are in stock?"}
    call = client.messages.create(
        model=MODEL_ID,
        max_tokens=24,
        system=SYSTEM,
        tools=[TOOL],
        tool_choice={"type": "any"},
        messages=[question],
        extra_body=GREEDY,
    )
    [use] = call.content
    assert use.type == "tool_use" and call.stop_reason == "tool_use"
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "14 units"}
    history = [
        question,
        {"role": "assistant", "content": [b.model_dump() for b in call.content]},
        {"role": "user", "content": [result]},
    ]
    answer = client.messages.create(
        model=MODEL_ID,
        max_tokens=8,
        system=SYSTEM,
        tools=[TOOL],
        tool_choice={"type": "none"},
        messages=history,
        extra_body=GREEDY,
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text"
    # The same conversation in OpenAI's shape, tools folded in as the server does for SmolLM2.
    tool = {
        "type": "function",
        "function": {"name": TOOL["name"], "parameters": TOOL["input_schema"]},
    }
    tool["function"]["description"] = TOOL["description"]
    arguments = json.dumps({"sku": use.input["sku"]})
    openai = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question["content"]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": use.name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": use.id, "content": "14 units"},
    ]
    folded, _ = template.messages_for(openai, [tool])
    assert answer.content[0].text == cold_reply(folded, max_tokens=8)
    # The second turn restored the first turn's prompt (its system prompt and tools at least).
    assert answer.usage.cache_read_input_tokens is not None
    assert answer.usage.cache_read_input_tokens >= len(template.prefix_tokens(folded[:2]))


def test_stop_sequences_cut_the_reply_as_a_cold_run_does(
    served: Served, cold_reply: Callable[..., str]
) -> None:
    client = served.client(KEYS[4])
    messages = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    reply = client.messages.create(
        model=MODEL_ID, max_tokens=16, stop_sequences=["3"], messages=messages, extra_body=GREEDY
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "3"
    assert reply.content[0].type == "text"
    assert reply.content[0].text == cold_reply(messages, max_tokens=16, stop=["3"])
    with client.messages.stream(
        model=MODEL_ID, max_tokens=16, stop_sequences=["3"], messages=messages, extra_body=GREEDY
    ) as stream:
        texts = [event.text for event in stream if event.type == "text"]
        streamed = stream.get_final_message()
    assert "".join(texts) == reply.content[0].text and len(texts) > 1
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", "3")
    free = client.messages.create(
        model=MODEL_ID,
        max_tokens=40,
        stop_sequences=["zebra"],
        messages=messages,
        extra_body=GREEDY,
    )
    assert free.stop_reason in ("end_turn", "max_tokens") and free.stop_sequence is None


_USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        ({"model": MODEL_ID, "messages": _USER}, 400, "invalid_request_error", "max_tokens"),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "x",
                                },
                            }
                        ],
                    }
                ],
            },
            400,
            "invalid_request_error",
            "images are not supported",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
            },
            400,
            "invalid_request_error",
            "documents are not supported",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x"}]}],
            },
            400,
            "invalid_request_error",
            "tool_use blocks belong in an assistant message",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "text"}]}],
            },
            400,
            "invalid_request_error",
            "messages[0].content[0].text must be a string",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "system": _system("2h"),
                "messages": _USER,
            },
            400,
            "invalid_request_error",
            "ttl must be '5m' or '1h'",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "system": _system() * 5,
                "messages": _USER,
            },
            400,
            "invalid_request_error",
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": _USER,
            },
            400,
            "invalid_request_error",
            "extended thinking is not supported",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "tools": [TOOL],
                "tool_choice": {"type": "tool", "name": "nope"},
                "messages": _USER,
            },
            400,
            "invalid_request_error",
            "tool_choice.name must name one of the tools",
        ),
        (
            {
                "model": MODEL_ID,
                "max_tokens": 4,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "messages": _USER,
            },
            400,
            "invalid_request_error",
            "server tools",
        ),
        (
            {"model": MODEL_ID, "max_tokens": 4, "temperature": 1.5, "messages": _USER},
            400,
            "invalid_request_error",
            "temperature must be between 0.0 and 1.0",
        ),
        ({"model": "claude-x", "max_tokens": 4, "messages": _USER}, 404, "not_found_error", ""),
    ],
)
def test_malformed_requests_get_anthropic_errors(
    served: Served, body: dict[str, Any], status: int, kind: str, says: str
) -> None:
    response = served.post(body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert says in error["error"]["message"]


def test_keys_are_checked_and_thinking_blocks_are_ignored(served: Served) -> None:
    with pytest.raises(anthropic.AuthenticationError) as wrong:
        served.client("not-a-key").messages.create(model=MODEL_ID, max_tokens=1, messages=_USER)
    assert wrong.value.status_code == 401
    assert wrong.value.body["error"]["type"] == "authentication_error"
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "x"}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [thinking, {"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "bye"},
    ]
    bare = [history[0], {"role": "assistant", "content": "Hello."}, history[2]]
    counts = [
        served.post({"model": MODEL_ID, "messages": m}, path="/v1/messages/count_tokens").json()
        for m in (history, bare)
    ]
    assert counts[0] == counts[1] and counts[0]["input_tokens"] > 0


def test_a_breakpoint_pin_expires_after_its_ttl_and_is_then_evicted_like_any_segment(
    served: Served, template: ChatTemplate
) -> None:
    system = "You are a terse assistant for a bakery. We open at 7am and sell sourdough bread."
    ask = {
        "model": MODEL_ID,
        "max_tokens": 2,
        "system": _system("5m", system),
        "messages": _USER,
        **GREEDY,
    }
    pinned = len(template.prefix_tokens(_chat("hi", system)[:1]))
    store = open_store(served.store)

    def pin() -> Any:
        [found] = [p for p in store.pins() if p.source == "cache_control" and p.n_tokens == pinned]
        return found

    first = served.post(ask, key=KEYS[5]).json()
    assert first["usage"]["cache_creation_input_tokens"] == pinned
    made = pin()
    assert made.expires is not None and made.expires - made.created == pytest.approx(
        300 * TTL_SCALE
    )
    time.sleep(1.5)
    again = served.post(ask, key=KEYS[5]).json()  # reading it refreshes it
    assert again["usage"]["cache_read_input_tokens"] >= pinned
    assert again["usage"]["cache_creation_input_tokens"] == 0
    refreshed = pin()
    assert refreshed.expires > made.expires + 1
    time.sleep(1.5)
    plain = served.post({**ask, "system": system}, key=KEYS[5]).json()  # no breakpoint: a read
    assert plain["usage"]["cache_read_input_tokens"] >= pinned
    assert plain["usage"]["cache_creation_input_tokens"] == 0
    refreshed = pin()
    assert refreshed.expires > made.expires + 2.5
    time.sleep(max(0.0, refreshed.expires - time.time()) + 0.2)
    segments = {s.key: s for s in store.segments()}
    assert refreshed.key in segments and refreshed.key not in pinned_keys(
        store, segments, time.time()
    )
    enforce_quota(store, 1, time.time())  # an expired pin is no protection: LRU evicts it
    assert refreshed.key not in {s.key for s in store.segments()}
    served.post({**ask, "system": "Another tenant's prompt."}, key=KEYS[6])  # live KV moves on
    rewritten = served.post(ask, key=KEYS[5]).json()
    assert rewritten["usage"]["cache_read_input_tokens"] == 0
    assert rewritten["usage"]["cache_creation_input_tokens"] == pinned
    store.close()


def test_errors_take_anthropic_shapes_and_status_codes(served: Served) -> None:
    busy = anthropic_error(Overloaded(3, 9))  # a full queue is Anthropic's "overloaded"
    assert busy.status == 529 and busy.headers == {"Retry-After": "3"}
    assert busy.body() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": busy.message},
    }
    too_long = anthropic_error(PromptTooLongError(5000, 2048, "prompt plus max_tokens"))
    assert (too_long.status, too_long.kind) == (400, "invalid_request_error")
    huge = httpx.post(
        served.url + "/v1/messages",
        content=b" " * (MAX_BODY_BYTES + 1),
        headers={"x-api-key": KEYS[0], "content-type": "application/json"},
        timeout=60,
    )
    assert huge.status_code == 413
    assert huge.json()["error"]["type"] == "request_too_large"
    long = [{"role": "user", "content": "timber " * N_CTX}]
    over = served.post({"model": MODEL_ID, "max_tokens": 4, "messages": long})
    assert over.status_code == 400 and "context" in over.json()["error"]["message"]


def test_a_breakpoint_inside_a_message_pins_up_to_the_end_of_its_block(
    served: Served, template: ChatTemplate
) -> None:
    store = open_store(served.store)
    notes = "Store notes: the timber saw is serviced on Mondays and closed for an hour at noon."

    def ask(question: str) -> dict[str, Any]:
        marked = {"type": "text", "text": notes, "cache_control": {"type": "ephemeral"}}
        content = [marked, {"type": "text", "text": question}]
        return {
            "model": MODEL_ID,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": content}],
        }

    first = served.post(ask("Can I get timber cut on Monday?"), key=KEYS[7]).json()
    tokens1 = template.tokens(
        [{"role": "user", "content": notes + "\n\nCan I get timber cut on Monday?"}]
    )
    written = first["usage"]["cache_creation_input_tokens"]
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert first["usage"]["input_tokens"] == len(tokens1) - written
    # The pinned prefix ends with the marked block: all of its text, none of the next block's.
    assert any(p.source == "cache_control" and p.n_tokens == written for p in store.pins())
    prefix = template.detokenize(tokens1[:written])
    assert prefix.rstrip().endswith(notes) and "Monday?" not in prefix
    second = served.post(ask("Is the saw serviced today?"), key=KEYS[7]).json()
    assert second["usage"]["cache_creation_input_tokens"] == 0
    assert second["usage"]["cache_read_input_tokens"] >= written
    store.close()


def test_a_client_that_leaves_a_stream_frees_the_model(served: Served) -> None:
    counting = "Count to 1000: 1, 2, 3, 4, 5, 6, 7, 8,"
    body = {"model": MODEL_ID, "max_tokens": 1000, "stream": True, **GREEDY}
    body["messages"] = [{"role": "user", "content": counting}]
    headers = {"x-api-key": KEYS[0]}
    url = served.url + "/v1/messages"
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url, json=body, headers=headers) as s,
    ):
        lines = s.iter_lines()
        got = [line for _, line in zip(range(12), lines, strict=False) if line]
        assert got[0] == "event: message_start" and got[2] == "event: content_block_start"
        assert got[4] == "event: ping" and got[6] == "event: content_block_delta"
    # Leaving the block closed the connection a few tokens into 1,000.
    t0 = time.perf_counter()
    reply = served.post({"model": MODEL_ID, "max_tokens": 2, "messages": _USER})
    assert reply.status_code == 200
    deadline = time.monotonic() + 30
    while "client went away" not in served.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, served.log.read_text(errors="replace")
        time.sleep(0.2)
    assert time.perf_counter() - t0 < 10  # 1,000 tokens take well over that here


def test_a_breakpoint_on_the_last_tool_pins_the_tools(
    served: Served, template: ChatTemplate
) -> None:
    system = "You answer stock questions for a timber yard in one word."
    marked = {**TOOL, "cache_control": {"type": "ephemeral"}}
    question = "Any hammers?"
    body = {"model": MODEL_ID, "max_tokens": 1, "system": system, "tools": [marked]}
    body["messages"] = [{"role": "user", "content": question}]
    reply = served.post(body, key=KEYS[8]).json()
    tool = {
        "type": "function",
        "function": {"name": TOOL["name"], "parameters": TOOL["input_schema"]},
    }
    tool["function"]["description"] = TOOL["description"]
    tokens = template.tokens(_chat(question, system), [tool])
    written = reply["usage"]["cache_creation_input_tokens"]
    assert reply["usage"]["cache_read_input_tokens"] == 0
    assert reply["usage"]["input_tokens"] == len(tokens) - written
    prefix = template.detokenize(tokens[:written])
    # SmolLM2's template folds the tools in after the system prompt: the pin holds both.
    assert system in prefix and '"required": ["sku"]' in prefix and question not in prefix


def test_a_request_maps_onto_the_openai_chat_the_library_runs() -> None:
    schema = {"type": "object", "properties": {}}
    request = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 8,
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            "tools": [{"name": "t", "input_schema": schema}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "Calling."},
                        {"type": "tool_use", "id": "u1", "name": "t", "input": {"x": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "u1",
                            "content": "no",
                            "is_error": True,
                        },
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
        }
    )
    messages, tools = request.chat()
    call = {"id": "u1", "type": "function", "function": {"name": "t", "arguments": '{"x": 1}'}}
    assert messages == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "u1", "content": "Error: no"},
        {"role": "user", "content": "and?"},
    ]
    assert tools == [{"type": "function", "function": {"name": "t", "parameters": schema}}]
    assert (request.tool_choice, request.parallel_tool_calls) == ("required", False)
    assert request.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    # The top-level cache_control marks the last block of the last message.
    [mark] = request.breakpoints
    assert (mark.kind, mark.index, mark.block, mark.ttl) == ("message", 2, 1, "1h")
