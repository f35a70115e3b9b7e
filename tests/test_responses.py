"""``POST /v1/responses`` on the real ``prefixcache serve`` and model, driven by the official
``openai`` client and by the OpenAI Agents SDK's default (Responses) model.

A Responses request runs as the chat request it maps onto, so its greedy output is the cold
run's, token for token, and it restores what the chat endpoint restores: the recipe's pinned
instructions on the first request, the whole previous prompt on each follow-up.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import N_CTX, SYSTEM, ask

from prefixcache.server.response_events import ResponseMemory, StoredResponse

INSTRUCTIONS = str(SYSTEM["content"])
MODEL = "shop"
TOOL = {
    "type": "function",
    "name": "stock_level",
    "description": "How many units of a product are in stock.",
    "parameters": {
        "type": "object",
        "properties": {"sku": {"type": "string"}},
        "required": ["sku"],
    },
}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
STOCK_QUESTION = "How many units of SKU H-200 are in stock?"


@pytest.fixture(scope="module")
def served(start_server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    recipes = tmp_path_factory.mktemp("recipes")
    (recipes / "shop.yaml").write_text(
        f"name: {MODEL}\nn_ctx: {N_CTX}\nprefix:\n  - system: {json.dumps(INSTRUCTIONS)}\n"
    )
    return start_server(recipes)


@pytest.fixture(scope="module")
def client(served: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0, timeout=300)


def chat_text(client: openai.OpenAI, messages: list[Any], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_a_response_is_the_cold_reply_and_restores_the_pinned_instructions(
    client, served, cold_reply
):
    question = "Do you cut timber to size?"
    reply = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=question,
        max_output_tokens=16,
        temperature=0,
    )
    assert reply.output_text == cold_reply(ask(question), max_tokens=16)
    assert reply.model == MODEL and reply.output[0].type == "message"
    assert reply.usage is not None and reply.usage.output_tokens <= 16
    assert reply.usage.input_tokens_details.cached_tokens >= served.pinned()[MODEL] > 0


def test_streamed_events_add_up_to_the_cold_reply(client, served, cold_reply):
    question = "Are you open on Sundays?"
    events = list(
        client.responses.create(
            model=MODEL,
            instructions=INSTRUCTIONS,
            input=question,
            max_output_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert "".join(deltas) == final.output_text == cold_reply(ask(question), max_tokens=16)
    assert final.usage.input_tokens_details.cached_tokens >= served.pinned()[MODEL]


def test_a_function_call_and_its_output_run_as_the_chat_endpoint_runs_them(client):
    asked = {"role": "user", "content": STOCK_QUESTION}
    first = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=[asked],
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "stock_level"
    sku = json.loads(call.arguments)["sku"]
    result = json.dumps({"sku": sku, "units": 14})

    # The same call streamed: the argument deltas add up to the arguments.
    events = list(
        client.responses.create(
            model=MODEL,
            instructions=INSTRUCTIONS,
            input=[asked],
            tools=[TOOL],
            tool_choice="required",
            max_output_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(pieces) == done.arguments == call.arguments
    assert events[-1].response.output[0].name == "stock_level"

    follow = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=[
            asked,
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],
        tools=[TOOL],
        tool_choice="none",
        max_output_tokens=16,
        temperature=0,
    )
    chat = chat_text(
        client,
        [
            {"role": "system", "content": INSTRUCTIONS},
            asked,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": result},
        ],
        tools=[CHAT_TOOL],
        tool_choice="none",
        max_tokens=16,
    )
    assert follow.output_text == chat.choices[0].message.content and follow.output_text
    assert follow.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt
    # The follow-up restores the whole first prompt (autosaved by the first call).
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_text_format_json_schema_gives_the_schema_s_object(client):
    schema = {
        "type": "object",
        "properties": {"sku": {"type": "string"}, "units": {"type": "integer"}},
        "required": ["sku", "units"],
    }
    reply = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input="SKU H-200 has 14 units. Extract the stock record.",
        text={"format": {"type": "json_schema", "name": "stock", "schema": schema}},
        max_output_tokens=48,
        temperature=0,
    )
    assert json.loads(reply.output_text) == {"sku": "H-200", "units": 14}


def test_previous_response_id_continues_the_stored_conversation(client):
    first = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input="Do you sell paint?",
        max_output_tokens=16,
        temperature=0,
    )
    second = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        previous_response_id=first.id,
        input="And garden supplies?",
        max_output_tokens=16,
        temperature=0,
    )
    chat = chat_text(
        client,
        [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "Do you sell paint?"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And garden supplies?"},
        ],
        max_tokens=16,
    )
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(
        model=MODEL, input="Hi", store=False, max_output_tokens=2, temperature=0
    )
    for gone in (first.id, unstored.id):
        with pytest.raises(openai.BadRequestError, match="not found") as caught:
            client.responses.create(
                model=MODEL, previous_response_id=gone, input="Hello?", max_output_tokens=2
            )
        assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "Hi", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "Hi", "conversation": "conv_1"}, "conversation"),
    ],
)
def test_unsupported_input_is_a_400_naming_the_field(served, body, param):
    reply = httpx.post(served.base_url + "/responses", json={"model": MODEL, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_metrics_count_cache_reads_and_writes_per_api(client, served):
    for _ in range(2):  # the second reads what the first wrote
        client.responses.create(model=MODEL, input="Hi there", max_output_tokens=2, temperature=0)
    chat_text(client, ask("Hi there"), max_tokens=2)
    text = httpx.get(served.url + "/metrics", timeout=30).text
    counters = {
        line.split("{")[0] + "|" + line.split('api="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("prefixcache_api_")
    }
    for api in ("/v1/responses", "/v1/chat/completions"):
        assert counters[f"prefixcache_api_calls_total|{api}"] >= 1, text
        assert counters[f"prefixcache_api_cache_read_tokens_total|{api}"] > 0, text
    assert counters["prefixcache_api_cache_write_tokens_total|/v1/responses"] > 0, text


def test_agents_sdk_default_responses_model_runs_a_tool(served):
    if importlib.util.find_spec("agents") is None:
        pytest.skip("the OpenAI Agents SDK is missing: pip install -e '.[frameworks]'")
    from agents import (
        Agent,
        AsyncOpenAI,
        ModelSettings,
        RunConfig,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)
    sent: list[tuple[str, dict[str, Any]]] = []

    async def record(response: httpx.Response) -> None:
        await response.aread()
        if response.request.method == "POST":
            usage = response.json().get("usage") if response.status_code == 200 else None
            sent.append((response.request.url.path, usage or {}))

    client = AsyncOpenAI(
        base_url=served.base_url,
        api_key="none",
        max_retries=0,
        http_client=httpx.AsyncClient(event_hooks={"response": [record]}, timeout=300),
    )
    skus: list[str] = []

    @function_tool
    def stock_level(sku: str) -> str:
        """How many units of a product are in stock."""
        skus.append(sku)
        return json.dumps({"sku": sku, "units": 14})

    agent = Agent(
        name="clerk",
        instructions=INSTRUCTIONS,
        model=MODEL,
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=48),
        tools=[stock_level],
    )
    # The SDK's default provider: the Responses API (no model class named).
    config = RunConfig(model_provider=OpenAIProvider(openai_client=client))
    result = asyncio.run(Runner.run(agent, STOCK_QUESTION, max_turns=3, run_config=config))
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert skus and skus[0]
    assert [path for path, _ in sent] == ["/v1/responses"] * len(sent) and len(sent) >= 2
    first, then = sent[0][1], sent[1][1]
    assert first["input_tokens_details"]["cached_tokens"] >= served.pinned()[MODEL]
    assert then["input_tokens_details"]["cached_tokens"] >= first["input_tokens"]


def test_stored_responses_are_bounded_per_tenant_and_expire():
    memory = ResponseMemory(per_tenant=2, seconds=0.5)

    def put(ns: str, rid: str) -> None:
        memory.put(ns, StoredResponse({"id": rid}, [{"role": "user", "content": rid}]))

    for rid in ("a", "b", "c"):
        put("alpha", rid)
    put("beta", "a")
    assert memory.get("alpha", "a") is None  # the oldest went first
    assert [memory.get("alpha", r) is not None for r in ("b", "c")] == [True, True]
    assert memory.get("beta", "b") is None and memory.get("beta", "a") is not None
    assert memory.delete("alpha", "b") and not memory.delete("alpha", "b")
    time.sleep(0.6)
    assert memory.get("alpha", "c") is None and memory.get("beta", "a") is None
