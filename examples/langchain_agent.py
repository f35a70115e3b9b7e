"""LangChain's ``ChatOpenAI`` against ``prefixcache serve``: a tool-calling agent loop on a pin.

Start the server in one terminal (it prewarms the recipes before it listens):

    .venv/bin/prefixcache serve --recipes recipes/ --recipes-root .

then run this in another (``pip install -e '.[frameworks]'`` installs langchain-openai):

    .venv/bin/python examples/langchain_agent.py [--base-url http://127.0.0.1:8000/v1]

The model is the support bot's recipe (``model="support-bot"``, recipes/support-bot.yaml), and
the agent sends what the recipe pins: its system prompt and few-shot turns, and its tool schemas
handed to ``bind_tools`` as OpenAI tool dicts, which LangChain passes on unchanged. So the first
request restores the whole pinned prefix, and each later one everything before its newest
messages. Each question is one turn of the loop: a call forced with ``tool_choice="required"``,
the tool runs here, the model may call again (``"auto"``), and a last ``"none"`` step makes it
answer. Every request prints its prompt tokens and how many the server restored instead of
prefilling (LangChain's ``usage_metadata["input_token_details"]["cache_read"]``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI

from prefixcache.recipes import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "support-bot.yaml"
QUESTIONS = [
    "Hi, where is my order BB-10422? My email is ann@example.com",
    "Do you also ship gift cards to Norway?",
]
ORDERS = {"BB-10422": {"status": "shipped", "tracking": "DPD 0155 2209", "items": ["BK-77"]}}


def run_tool(name: str, args: dict[str, Any]) -> str:
    """The support bot's tools, on made-up data."""
    if name == "lookup_order":
        order = ORDERS.get(str(args.get("order_id", "")).upper())
        return json.dumps(order or {"error": "no order with that number and email"})
    if name == "search_faq":
        return json.dumps(
            ["Damaged books are refunded in full, including shipping; no need to send them back."]
        )
    if name == "refund_order":
        return json.dumps({"refunded": args.get("item_skus") or "all items"})
    return json.dumps({"error": f"no tool named {name}"})


def recipe_messages() -> tuple[list[BaseMessage], list[dict[str, Any]]]:
    """The support bot's pinned messages as LangChain messages, and its tool schemas."""
    recipe = load_recipe(RECIPE)
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](m["content"]) for m in recipe.messages], recipe.tools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="if the server was given --api-key")
    args = parser.parse_args()

    llm = ChatOpenAI(
        model="support-bot",
        base_url=args.base_url,
        api_key=args.api_key,
        temperature=0,
        max_tokens=96,
    )
    messages, tools = recipe_messages()
    print(f"{'tool_choice':<11} {'prompt':>6} {'cached':>6} {'s':>5}")
    for question in QUESTIONS:
        print(f"user: {question}")
        messages.append(HumanMessage(question))
        for choice in ("required", "auto", "none"):
            t0 = time.perf_counter()
            model = llm.bind_tools(tools, tool_choice=choice, parallel_tool_calls=False)
            reply = model.invoke(messages)
            usage = reply.usage_metadata or {}
            cached = usage.get("input_token_details", {}).get("cache_read", 0)
            said = reply.tool_calls or reply.invalid_tool_calls or reply.content
            print(
                f"{choice:<11} {usage.get('input_tokens', 0):>6} {cached:>6} "
                f"{time.perf_counter() - t0:>5.2f}  {str(said)[:90]}"
            )
            messages.append(reply)
            if not (reply.tool_calls or reply.invalid_tool_calls):
                break
            for call in reply.tool_calls:
                result = run_tool(call["name"], call["args"])
                messages.append(ToolMessage(result, tool_call_id=call["id"]))
            for bad in reply.invalid_tool_calls:  # cut off by max_tokens: say so, as agents do
                error = json.dumps({"error": f"invalid arguments: {bad['error']}"[:200]})
                messages.append(ToolMessage(error, tool_call_id=bad["id"]))


if __name__ == "__main__":
    main()
