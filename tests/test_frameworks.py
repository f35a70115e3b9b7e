"""The frameworks agents are built with, against the real ``prefixcache serve`` and the real model.

Each framework (the OpenAI Agents SDK, LangChain, pydantic-ai, smolagents) runs its own agent loop
over HTTP, as its users would run it: the model's tool call is parsed by the framework, the tool
runs, its result goes back, and the model's answer comes back; then a follow-up question in the
same conversation. The first step is forced with ``tool_choice="required"`` where the framework
lets a step be forced (a 135M model needs it). Every chat completion a framework sends is
recorded by an httpx event hook on its client, so that the test reads ``cached_tokens`` from the
responses: the first request restores the framework's pinned system prompt (a recipe per
framework, served as a model name), and every later request restores at least the whole prompt of
the one before it. One structured-output call per framework that has them (LangChain's
``with_structured_output``, pydantic-ai's ``NativeOutput``, the Agents SDK's ``output_type``)
returns a validated object.

Needs the optional ``[frameworks]`` extra (``pip install -e '.[frameworks]'``); a framework that
is not installed is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import N_CTX
from pydantic import BaseModel

from prefixcache.server.assemble import Assembler

SYSTEM = (
    "You are the stock clerk of Bolt & Board, a hardware store. Look up stock levels with the "
    "stock_level tool, then answer in one short sentence. Opening hours: 8am to 6pm, Monday to "
    "Saturday. We sell tools, timber, fasteners, paint and garden supplies."
)


def system(framework: str) -> str:
    """The system prompt a framework sends, and its recipe pins: one per framework, so that the
    first request of each restores its pin and nothing a test before it stored."""
    return f"{SYSTEM} You run inside {framework}."


QUESTIONS = ("How many units of SKU H-200 are in stock?", "And SKU S-10?")
STOCK = {"H-200": 14, "S-10": 0}
RECORD = "SKU H-200 has 14 units. Extract the stock record."
FRAMEWORKS = ("agents", "langchain_openai", "pydantic_ai", "smolagents")
EXTRA = "the [frameworks] extra is not installed: pip install -e '.[frameworks]'"


def needs(module: str) -> None:
    """Skip the calling test unless ``module`` (one of the [frameworks] extra) is importable."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is missing; {EXTRA}")


class Stock(BaseModel):
    """The structured output the frameworks are asked for."""

    sku: str
    units: int


@dataclass
class Shelf:
    """The tool's side: every call the frameworks made, with the arguments the model wrote."""

    calls: list[str] = field(default_factory=list)

    def stock_level(self, sku: str) -> str:
        self.calls.append(sku)
        return json.dumps({"sku": sku, "units": STOCK.get(sku, 3)})


# --- recording what a framework sends and gets back ---------------------------------------------


@dataclass(frozen=True)
class Exchange:
    request: dict[str, Any]
    response: dict[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return int(self.response["usage"]["prompt_tokens"])

    @property
    def cached_tokens(self) -> int:
        return int(self.response["usage"]["prompt_tokens_details"]["cached_tokens"])

    @property
    def message(self) -> dict[str, Any]:
        return dict(self.response["choices"][0]["message"])


def _sse_body(text: str) -> dict[str, Any]:
    """A streamed reply as the one response it adds up to (usage if the client asked for it)."""
    chunks = [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    return dict(Assembler().extend(chunks).result())


class Recorder:
    """Every chat completion sent through a client made here, read by an httpx event hook.

    The frameworks expose usage each in their own way (or not at all); the HTTP exchange is the
    same for all of them.
    """

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def _record(self, response: httpx.Response) -> None:
        if not response.request.url.path.endswith("/chat/completions"):
            return
        request = json.loads(response.request.content)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            body = _sse_body(response.text)
        else:
            body = response.json()
        self.exchanges.append(Exchange(request, body))

    def client(self) -> httpx.Client:
        def hook(response: httpx.Response) -> None:
            response.read()
            self._record(response)

        return httpx.Client(event_hooks={"response": [hook]}, timeout=300)

    def async_client(self) -> httpx.AsyncClient:
        async def hook(response: httpx.Response) -> None:
            await response.aread()
            self._record(response)

        return httpx.AsyncClient(event_hooks={"response": [hook]}, timeout=300)

    def table(self) -> str:
        """One line per request (shown when an assertion fails)."""
        lines = []
        for i, ex in enumerate(self.exchanges):
            msg = ex.message
            said = msg.get("tool_calls") or msg.get("content")
            lines.append(
                f"{i}: tool_choice={ex.request.get('tool_choice')} prompt={ex.prompt_tokens} "
                f"cached={ex.cached_tokens} -> {json.dumps(said)[:160]}"
            )
        return "\n".join(lines)


def reusable(previous_prompt: int, prompt: int, unit: int = 512) -> int:
    """The tokens a request restores at least when its prompt extends the previous prompt.

    All of them, unless a cold run's batches (llama-cpp-python's n_batch, 512) would not line
    up with a restored prefix's end: a suffix of 512k + 1 tokens keeps one token less, and so
    does a gap of one token before a last token that a cold run evaluates alone
    (``LlamaKV.suffix_start``, which keeps the output identical to a cold run).
    """
    suffix = max(1, prompt - previous_prompt)
    if (prompt - 1) % unit == 0:
        suffix += 1 if suffix == 2 else 0
    elif suffix % unit == 1:
        suffix += 1
    return prompt - suffix


def assert_restores_and_grows(recorder: Recorder, pinned: int) -> None:
    """The first request restores the pinned recipe; each later one the previous whole prompt."""
    print(f"pinned {pinned}\n{recorder.table()}")  # shown with pytest -s
    ex = recorder.exchanges
    assert len(ex) >= 3, recorder.table()
    assert ex[0].cached_tokens >= pinned > 0, recorder.table()
    for before, after in itertools.pairwise(ex):
        floor = reusable(before.prompt_tokens, after.prompt_tokens)
        assert after.cached_tokens >= floor, recorder.table()
        assert after.cached_tokens > before.cached_tokens or floor < before.prompt_tokens


def assert_forced_first_call(recorder: Recorder, shelf: Shelf) -> None:
    """The first request forced a call, the model made it, and the framework ran the tool."""
    first = recorder.exchanges[0]
    assert first.request.get("tool_choice") == "required", recorder.table()
    assert first.response["choices"][0]["finish_reason"] == "tool_calls", recorder.table()
    (call, *_) = first.message["tool_calls"]
    assert call["function"]["name"] == "stock_level"
    assert json.loads(call["function"]["arguments"])["sku"] == shelf.calls[0]


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    pinned: dict[str, int]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _smolagents_system_prompt() -> str | None:
    """smolagents replaces the system prompt with its own (tools described in it): pin that."""
    if importlib.util.find_spec("smolagents") is None:
        return None
    agent = _smolagents_agent("http://127.0.0.1:9/v1", Shelf(), Recorder())
    return str(agent.system_prompt)


def _write_recipe(folder: Path, name: str, system: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\nn_ctx: {N_CTX}\nprefix:\n  - system: {json.dumps(system)}\n"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``prefixcache serve`` for the whole module, a recipe (a model name) per framework,
    each pinning the system prompt that framework sends."""
    if not any(importlib.util.find_spec(m) for m in FRAMEWORKS):
        pytest.skip(EXTRA)
    tmp = tmp_path_factory.mktemp("frameworks")
    recipes = tmp / "recipes"
    recipes.mkdir()
    for name in ("agents-sdk", "langchain", "pydantic-ai"):
        _write_recipe(recipes, name, system(name))
    smol = _smolagents_system_prompt()
    if smol is not None:
        _write_recipe(recipes, "smolagents", smol)
    port = _free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "prefixcache", "--store", str(tmp / "store")]
    cmd += ["--n-ctx", str(N_CTX), "serve", "--recipes", str(recipes), "--port", str(port)]
    cmd += ["--watch-interval", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"the server did not listen:\n{log.read_text()}")
        pinned = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"recipe (\S+): (\d+) tokens pinned", log.read_text())
        }
        yield Served(url, pinned)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the OpenAI Agents SDK ----------------------------------------------------------------------


def test_openai_agents_sdk_runs_tool_calls_and_structured_output(served):
    needs("agents")
    from agents import (
        Agent,
        AsyncOpenAI,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    shelf, recorder = Shelf(), Recorder()
    client = AsyncOpenAI(
        base_url=served.base_url,
        api_key="none",
        http_client=recorder.async_client(),
        max_retries=0,
    )
    model = OpenAIChatCompletionsModel(model="agents-sdk", openai_client=client)

    @function_tool
    def stock_level(sku: str) -> str:
        """How many units of a product are in stock."""
        return shelf.stock_level(sku)

    # tool_choice="required" forces the first step; the SDK resets it to auto once a tool has
    # run (reset_tool_choice, its default), so the model then answers.
    agent = Agent(
        name="clerk",
        instructions=system("agents-sdk"),
        model=model,
        model_settings=ModelSettings(
            tool_choice="required", temperature=0, max_tokens=48, include_usage=True
        ),
        tools=[stock_level],
    )

    async def conversation() -> tuple[list[Any], Any]:
        first = await Runner.run(agent, QUESTIONS[0], max_turns=4)
        history = [*first.to_input_list(), {"role": "user", "content": QUESTIONS[1]}]
        second = Runner.run_streamed(agent, history, max_turns=4)  # delta.tool_calls this time
        async for _ in second.stream_events():
            pass
        return [first.final_output, second.final_output], second.context_wrapper.usage

    answers, streamed_usage = asyncio.run(conversation())
    assert all(isinstance(a, str) and a.strip() for a in answers), recorder.table()
    assert_forced_first_call(recorder, shelf)
    assert len(shelf.calls) >= 2  # a call per question, the second one streamed
    assert [ex.request.get("stream", False) for ex in recorder.exchanges[-2:]] == [True, True]
    assert_restores_and_grows(recorder, served.pinned["agents-sdk"])
    # The SDK reads the restored tokens from the streamed usage chunk too.
    assert streamed_usage.input_tokens_details.cached_tokens > 0

    structured = Recorder()
    client = AsyncOpenAI(
        base_url=served.base_url,
        api_key="none",
        http_client=structured.async_client(),
        max_retries=0,
    )
    extractor = Agent(
        name="extractor",
        instructions=system("agents-sdk"),
        model=OpenAIChatCompletionsModel(model="agents-sdk", openai_client=client),
        model_settings=ModelSettings(temperature=0, max_tokens=48),
        output_type=Stock,
    )
    result = asyncio.run(Runner.run(extractor, RECORD))
    assert result.final_output == Stock(sku="H-200", units=14), structured.table()
    assert structured.exchanges[0].request["response_format"]["type"] == "json_schema"


# --- LangChain ----------------------------------------------------------------------------------


def test_langchain_bind_tools_loop_and_with_structured_output(served):
    needs("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    shelf, recorder = Shelf(), Recorder()

    @tool
    def stock_level(sku: str) -> str:
        """How many units of a product are in stock."""
        return shelf.stock_level(sku)

    llm = ChatOpenAI(
        model="langchain",
        base_url=served.base_url,
        api_key="none",
        temperature=0,
        max_tokens=48,
        max_retries=0,
        http_client=recorder.client(),
    )
    messages: list[Any] = [SystemMessage(system("langchain"))]
    for question in QUESTIONS:
        messages.append(HumanMessage(question))
        # The agent loop: a forced call first, then the model's choice, then its answer.
        for choice in ("required", "auto", "none"):
            reply = llm.bind_tools([stock_level], tool_choice=choice).invoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                result = stock_level.invoke(call["args"])
                messages.append(ToolMessage(result, tool_call_id=call["id"]))
        assert not reply.tool_calls and isinstance(reply.content, str) and reply.content.strip()
    assert_forced_first_call(recorder, shelf)
    assert_restores_and_grows(recorder, served.pinned["langchain"])
    # LangChain reports the restored tokens too, as its own usage metadata.
    assert reply.usage_metadata["input_token_details"]["cache_read"] > 0

    structured = Recorder()
    llm = ChatOpenAI(
        model="langchain",
        base_url=served.base_url,
        api_key="none",
        temperature=0,
        max_tokens=48,
        max_retries=0,
        http_client=structured.client(),
    )
    record = llm.with_structured_output(Stock).invoke(
        [SystemMessage(system("langchain")), HumanMessage(RECORD)]
    )
    assert record == Stock(sku="H-200", units=14), structured.table()
    assert structured.exchanges[0].request["response_format"]["type"] == "json_schema"
    assert structured.exchanges[0].cached_tokens >= served.pinned["langchain"]


# --- pydantic-ai --------------------------------------------------------------------------------


def test_pydantic_ai_agent_runs_tool_calls_and_native_output(served):
    needs("pydantic_ai")
    from openai import AsyncOpenAI
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    shelf, recorder = Shelf(), Recorder()

    def model(rec: Recorder) -> OpenAIChatModel:
        client = AsyncOpenAI(
            base_url=served.base_url,
            api_key="none",
            http_client=rec.async_client(),
            max_retries=0,
        )
        return OpenAIChatModel("pydantic-ai", provider=OpenAIProvider(openai_client=client))

    @dataclass
    class FirstStepCalls(AbstractCapability[Any]):
        """pydantic-ai refuses a static tool_choice="required" (no step could answer); per step,
        through a capability's model settings, it is allowed: forced first, free, then text."""

        def get_model_settings(self) -> Any:
            def settings(ctx: Any) -> dict[str, Any]:
                return {1: {"tool_choice": "required"}, 2: {}}.get(
                    ctx.run_step, {"tool_choice": "none"}
                )

            return settings

    agent = Agent(
        model(recorder),
        system_prompt=system("pydantic-ai"),
        model_settings={"temperature": 0, "max_tokens": 48},
        capabilities=[FirstStepCalls()],
    )

    @agent.tool_plain
    def stock_level(sku: str) -> str:
        """How many units of a product are in stock."""
        return shelf.stock_level(sku)

    async def conversation() -> list[str]:
        first = await agent.run(QUESTIONS[0])
        second = await agent.run(QUESTIONS[1], message_history=first.all_messages())
        return [first.output, second.output]

    answers = asyncio.run(conversation())
    assert all(isinstance(a, str) and a.strip() for a in answers), recorder.table()
    assert_forced_first_call(recorder, shelf)
    assert_restores_and_grows(recorder, served.pinned["pydantic-ai"])

    structured = Recorder()
    extractor = Agent(
        model(structured),
        system_prompt=system("pydantic-ai"),
        output_type=NativeOutput(Stock),
        model_settings={"temperature": 0, "max_tokens": 48},
    )
    result = asyncio.run(extractor.run(RECORD))
    assert result.output == Stock(sku="H-200", units=14), structured.table()
    assert structured.exchanges[0].request["response_format"]["type"] == "json_schema"
    assert structured.exchanges[0].cached_tokens >= served.pinned["pydantic-ai"]


# --- smolagents ---------------------------------------------------------------------------------


def _smolagents_agent(base_url: str, shelf: Shelf, recorder: Recorder) -> Any:
    from smolagents import OpenAIServerModel, ToolCallingAgent, tool

    @tool
    def stock_level(sku: str) -> str:
        """How many units of a product are in stock.

        Args:
            sku: The product's SKU, e.g. "H-200".
        """
        return shelf.stock_level(sku)

    class AnswerOnceObserved(OpenAIServerModel):
        """smolagents sends tool_choice="required" on every step and ends a run only on a call
        of its final_answer tool. SmolLM2-135M keeps calling the same tool, so once a tool's
        observation is the last message, the next call is named: final_answer."""

        def generate(self, messages: list[Any], *args: Any, **kwargs: Any) -> Any:
            last = messages[-1] if messages else None
            role = last.get("role") if isinstance(last, dict) else getattr(last, "role", None)
            if kwargs.get("tools_to_call_from") and str(getattr(role, "value", role)) == (
                "tool-response"
            ):
                kwargs["tool_choice"] = {"type": "function", "function": {"name": "final_answer"}}
            return super().generate(messages, *args, **kwargs)

    model = AnswerOnceObserved(
        model_id="smolagents",
        api_base=base_url,
        api_key="none",
        client_kwargs={"http_client": recorder.client(), "max_retries": 0},
        temperature=0,
        max_tokens=48,
        parallel_tool_calls=False,
    )
    return ToolCallingAgent(tools=[stock_level], model=model, max_steps=3, verbosity_level=0)


def test_smolagents_tool_calling_agent_runs_tool_calls(served):
    needs("smolagents")
    shelf, recorder = Shelf(), Recorder()
    agent = _smolagents_agent(served.base_url, shelf, recorder)
    answers = [agent.run(QUESTIONS[0]), agent.run(QUESTIONS[1], reset=False)]
    assert all(isinstance(a, str) and a.strip() for a in answers), recorder.table()
    assert_forced_first_call(recorder, shelf)
    last = recorder.exchanges[-1].message["tool_calls"][0]["function"]
    assert last["name"] == "final_answer"
    assert json.loads(last["arguments"])["answer"] == answers[-1]
    assert_restores_and_grows(recorder, served.pinned["smolagents"])
