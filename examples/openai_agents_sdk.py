"""The OpenAI Agents SDK against ``prefixcache serve``: an agent whose tool calls the model makes.

Start the server in one terminal (it prewarms the recipes before it listens):

    .venv/bin/prefixcache serve --recipes recipes/ --recipes-root .

then run this in another (``pip install -e '.[frameworks]'`` installs openai-agents):

    .venv/bin/python examples/openai_agents_sdk.py [--base-url http://127.0.0.1:8000/v1]

The agent is the support bot of recipes/support-bot.yaml (``model="support-bot"``) with its
system prompt as instructions and its few-shot turns as the start of the conversation, on the
SDK's chat-completions model (``OpenAIChatCompletionsModel`` with an ``AsyncOpenAI`` client whose
``base_url`` is the server; tracing off, since it would upload to OpenAI). The first step of each
run is forced with ``tool_choice="required"``; the SDK sets it back to auto once a tool has run,
so the model then answers. It prints, per request, the prompt tokens and how many of them the
server restored instead of prefilling, as the SDK itself reports them.

The SDK writes its own tool schemas (``@function_tool``: titles, ``additionalProperties`` and
``"strict"``), not the recipe's, so the first request restores the recipe up to its tool
schemas; every later request restores the whole conversation before its newest messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from agents import (
    Agent,
    AsyncOpenAI,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from prefixcache.recipes import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "support-bot.yaml"
QUESTIONS = [
    "Hi, where is my order BB-10422? My email is ann@example.com",
    "Do you also ship gift cards to Norway?",
]


@function_tool
def lookup_order(order_id: str, email: str) -> str:
    """Fetch an order's status, items, total and shipping details by its order number."""
    if order_id.upper() != "BB-10422":
        return json.dumps({"error": "no order with that number and email"})
    return json.dumps({"status": "shipped", "tracking": "DPD 0155 2209", "items": ["BK-77"]})


@function_tool
def search_faq(query: str) -> str:
    """Search the help centre articles and return the best matching passages."""
    return json.dumps(
        ["Damaged books are refunded in full, including shipping; no need to send them back."]
    )


async def main(base_url: str, api_key: str) -> None:
    set_tracing_disabled(True)
    recipe = load_recipe(RECIPE)
    system, *few_shot = recipe.messages
    client = AsyncOpenAI(base_url=base_url, api_key=api_key)
    agent = Agent(
        name="Bea",
        instructions=system["content"],
        model=OpenAIChatCompletionsModel(model="support-bot", openai_client=client),
        model_settings=ModelSettings(
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=64,
            include_usage=True,
        ),
        tools=[lookup_order, search_faq],
    )
    history: list[Any] = [{"role": m["role"], "content": m["content"]} for m in few_shot]
    print(f"{'request':>7} {'prompt':>6} {'cached':>6}")
    n = 0
    for question in QUESTIONS:
        print(f"user: {question}")
        result = await Runner.run(agent, [*history, {"role": "user", "content": question}])
        for entry in result.context_wrapper.usage.request_usage_entries:
            n += 1
            cached = entry.input_tokens_details.cached_tokens
            print(f"{n:>7} {entry.input_tokens:>6} {cached:>6}")
        for item in result.new_items:
            if item.type == "tool_call_item":
                call: Any = item.raw_item
                print(f"        called {call.name}({call.arguments})")
        print(f"Bea: {str(result.final_output).strip()[:200]}")
        history = result.to_input_list()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="if the server was given --api-key")
    args = parser.parse_args()
    asyncio.run(main(args.base_url, args.api_key))
