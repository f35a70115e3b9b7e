"""What OpenAI clients send, checked by one normaliser for ``PrefixCache.chat`` and the server.

Malformed requests are errors that name the field (``RequestError`` in the library, HTTP 400 in
OpenAI's error shape in the server); what clients legitimately send (content-part lists on every
role, the developer role, ``max_completion_tokens``, ``parallel_tool_calls``, ``stream_options``,
``user``, ``metadata``, ``store``) is accepted, and gives the reply a cold run gives to the
equivalent plain request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import N_CTX, SYSTEM
from fastapi.testclient import TestClient

from prefixcache import PrefixCacheError
from prefixcache.request import RequestError, normalise_chat
from prefixcache.server import Server, ServerConfig
from prefixcache.server.app import create_app

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
TOOL = {
    "type": "function",
    "function": {
        "name": "stock_level",
        "description": "How many units of a product are in stock.",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 12}},
            "required": ["sku"],
        },
    },
}
QUESTION = "Do you cut timber to size?"


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


#: (what is wrong, the request, the field the error names)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown role",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
    ),
    (
        "tool without function.name",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}],
        },
        "tools[0].function.name",
    ),
    (
        "tool without function",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        "tools[0].function",
    ),
    (
        "tool_choice naming a function not in tools",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}},
        },
        "tool_choice.function.name",
    ),
    (
        "tool message without tool_call_id",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
                {"role": "tool", "content": "{}"},
            ]
        },
        "messages[2].tool_call_id",
    ),
    (
        "image content part",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [*parts("look"), {"type": "image_url", "image_url": {"url": "x"}}],
                }
            ]
        },
        "messages[0].content[1]",
    ),
    (
        "assistant tool call without a name",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.name",
    ),
    (
        "tool_choice required without tools",
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        "tool_choice",
    ),
    (
        "unknown response_format",
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
        "response_format.type",
    ),
    (
        "user message without content",
        {"messages": [{"role": "user"}]},
        "messages[0].content",
    ),
]


def _split(request: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    body = dict(request)
    return body.pop("messages"), body


@pytest.mark.parametrize(("what", "request_", "param"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_request_errors_naming_the_field(what, request_, param):
    messages, rest = _split(request_)
    with pytest.raises(RequestError) as caught:
        normalise_chat(messages, **rest)
    assert caught.value.param == param
    assert isinstance(caught.value, PrefixCacheError)


def test_what_openai_clients_send_is_accepted_and_normalised():
    call = normalise_chat(
        [
            {"role": "developer", "content": parts("Be ", "brief.")},
            {"role": "user", "content": parts("Stock of H-200?")},
            {
                "role": "assistant",
                "content": parts(""),
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "stock_level", "arguments": '{"sku": "H-200"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": parts('{"units": 14}')},
        ],
        [TOOL],
        tool_choice={"type": "function", "function": {"name": "stock_level"}},
        parallel_tool_calls=False,
        max_completion_tokens=3,
        max_tokens=10,
        stream_options={"include_usage": True},
        user="agent-7",
        metadata={"run": "1"},
        store=False,
    )
    assert [m["content"] for m in call.messages] == [
        "Be brief.",
        "Stock of H-200?",
        "",
        '{"units": 14}',
    ]
    assert call.messages[0]["role"] == "developer"  # the template decides (see test below)
    assert call.tool_choice.mode == "required" and call.tool_choice.name == "stock_level"
    assert call.parallel_tool_calls is False
    assert call.options == {"max_tokens": 3, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("max_tokens", "max_completion_tokens", "expected"),
    [(None, 3, 3), (10, 3, 3), (5, 10, 5), (7, None, 7), (-1, 4, 4)],
)
def test_max_completion_tokens_is_max_tokens_and_the_smaller_wins(
    max_tokens, max_completion_tokens, expected
):
    call = normalise_chat(
        [{"role": "user", "content": "hi"}],
        max_tokens=max_tokens,
        max_completion_tokens=max_completion_tokens,
    )
    assert call.options["max_tokens"] == expected


# --- the library, on the real model ---------------------------------------------------------------


def test_chat_takes_what_openai_clients_send_and_matches_the_cold_reply(
    open_cache, cold_reply: Callable[..., str]
):
    cache = open_cache()
    half = len(SYSTEM["content"]) // 2
    sent = [
        {"role": "developer", "content": parts(SYSTEM["content"][:half], SYSTEM["content"][half:])},
        {"role": "user", "content": parts(QUESTION)},
    ]
    reply = cache.chat(
        sent,
        max_completion_tokens=3,
        parallel_tool_calls=True,
        stream_options={"include_usage": True},
        user="agent-7",
        metadata={"run": "1"},
        store=False,
        temperature=0,
    )
    assert reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["finish_reason"] == "length"
    plain = [SYSTEM, {"role": "user", "content": QUESTION}]
    assert reply["choices"][0]["message"]["content"] == cold_reply(plain, max_tokens=3)
    # The developer message is the system message to a template without a developer role.
    assert cache.template.tokens(sent) == cache.template.tokens(plain)


@pytest.mark.parametrize(("what", "request_", "param"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_chat_refuses_malformed_requests_before_any_model_work(open_cache, what, request_, param):
    cache = open_cache()
    messages, rest = _split(request_)
    with pytest.raises(RequestError, match=r"\S") as caught:
        cache.chat(messages, max_tokens=4, **rest)
    assert caught.value.param == param
    assert cache.stats()["calls"] == 0


# --- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The server app in process, on the real model and a temporary store."""
    store: Path = tmp_path_factory.mktemp("store")
    server = Server(ServerConfig(store=str(store), n_ctx=N_CTX, watch_interval=None))
    server.start()
    with TestClient(create_app(server)) as test_client:
        yield test_client


@pytest.mark.parametrize(("what", "request_", "param"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_the_server_answers_malformed_requests_with_a_400_in_openai_shape(
    client, what, request_, param
):
    response = client.post("/v1/chat/completions", json={"model": MODEL_ID, **request_})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_the_server_takes_what_openai_clients_send(client, cold_reply: Callable[..., str]):
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL_ID,
            "messages": [
                {"role": "developer", "content": parts(SYSTEM["content"])},
                {"role": "user", "content": parts(QUESTION)},
            ],
            "max_completion_tokens": 3,
            "parallel_tool_calls": True,
            "stream_options": {"include_usage": True},
            "user": "agent-7",
            "metadata": {"run": "1"},
            "store": False,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 3
    plain = [SYSTEM, {"role": "user", "content": QUESTION}]
    assert body["choices"][0]["message"]["content"] == cold_reply(plain, max_tokens=3)


def test_the_server_returns_tool_calls_whole_and_streamed(client):
    request = {
        "model": MODEL_ID,
        "messages": [SYSTEM, {"role": "user", "content": "How many H-200 hammers are in stock?"}],
        "tools": [TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 48,
        "temperature": 0,
    }
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "stock_level"
    assert set(json.loads(call["function"]["arguments"])) == {"sku"}

    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [
        tc
        for c in chunks
        for tc in (c["choices"][0]["delta"].get("tool_calls") or [] if c["choices"] else [])
    ]
    assert pieces[0]["id"] and pieces[0]["function"]["name"] == "stock_level"
    arguments = "".join(p["function"].get("arguments") or "" for p in pieces)
    assert arguments == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
