"""A tool-using agent loop on a pinned prefix, printing cached vs prefilled tokens per model call.

Run: python examples/agent_loop.py [--store DIR] [--turns N]

The system prompt and the tool schemas are pinned once. Each customer question is one agent
turn, and the model makes every call in it: its first step is forced with
``tool_choice="required"`` (a grammar makes the reply a well-formed call of one of the tools), the
call runs here and its result goes back as a ``tool`` message, then the model may call again
(``"auto"``) until a last step with ``"none"`` has it answer. Each request restores the
conversation so far from the store and prefills only what is new since the previous request.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefixcache import PrefixCache

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order by its number and return its status.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "stock_level",
            "description": "How many units of a product are in stock.",
            "parameters": {
                "type": "object",
                "properties": {"sku": {"type": "string"}},
                "required": ["sku"],
            },
        },
    },
]

SYSTEM = (
    "You are the order assistant of Bolt & Board, a hardware store. Use the tools to answer "
    "questions about orders and stock. Keep answers to one sentence. Opening hours: 8am-6pm, "
    "Monday to Saturday. Delivery takes two working days; timber is cut to size for free."
)

QUESTIONS = [
    "Where is order 1042?",
    "Do you have SKU H-200 hammers?",
    "And order 1043?",
    "How many S-10 saws are in stock?",
    "Is order 1050 late?",
]

#: What the tools know.
ORDERS = {"1042": "shipped", "1043": "packing", "1050": "delivered"}
STOCK = {"H-200": 14, "S-10": 0, "P-7": 120}

#: Model calls per turn at most: a forced call, calls the model chooses, then an answer.
MAX_STEPS = 3
MAX_TOKENS = 48


def run_tool(name: str, arguments: str) -> str:
    """Run one call as the model wrote it; the result (or what was wrong) as JSON text."""
    try:
        args = json.loads(arguments)
    except ValueError:  # a call cut off by max_tokens
        return json.dumps({"error": f"arguments are not valid JSON: {arguments!r}"})
    if name == "lookup_order":
        order = str(args.get("order_id", "")).lstrip("#")
        status = ORDERS.get(order)
        return json.dumps({"order_id": order, "status": status or "no such order"})
    if name == "stock_level":
        sku = str(args.get("sku", ""))
        return json.dumps({"sku": sku, "units": STOCK.get(sku, 0)})
    return json.dumps({"error": f"no tool named {name!r}"})


def tool_choice(step: int) -> str:
    """``required`` first, ``auto`` in between, ``none`` last, so that a turn ends in an answer."""
    if step == 0:
        return "required"
    return "none" if step == MAX_STEPS - 1 else "auto"


def agent_turn(
    chat: Callable[..., dict[str, Any]], messages: list[dict[str, Any]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """One turn of the loop on ``messages`` (extended in place): ``(tool_choice, reply)`` per
    model call. ``chat(messages, tool_choice=...)`` is the model; the calls in its replies run
    here and their results are appended as ``tool`` messages."""
    for step in range(MAX_STEPS):
        choice = tool_choice(step)
        reply = chat(messages, tool_choice=choice)
        yield choice, reply
        message = reply["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        messages.append(
            {
                "role": "assistant",
                "content": message.get("content"),
                **({"tool_calls": calls} if calls else {}),
            }
        )
        if not calls:
            return
        for call in calls:
            result = run_tool(call["function"]["name"], call["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def said(message: dict[str, Any]) -> str:
    """A reply in one short line: its calls, else its text."""
    calls = message.get("tool_calls") or []
    if calls:
        return "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
    return repr((message.get("content") or "").strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store path (default: the user cache)")
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    args = parser.parse_args()

    cache = PrefixCache.open(store=args.store, n_ctx=4096)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    info = cache.pin(messages, name="agent-loop-example", tools=TOOLS)
    print(f"pinned {info.n_tokens} tokens ({info.evaluated_tokens} prefilled now)\n")

    def chat(msgs: list[dict[str, Any]], tool_choice: str) -> dict[str, Any]:
        return cache.chat(
            msgs,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )

    print(f"{'turn':>4} {'tool_choice':<11} {'prompt':>6} {'cached':>6} {'prefilled':>9} {'s':>5}")
    for turn, question in enumerate(QUESTIONS[: args.turns], 1):
        messages.append({"role": "user", "content": question})
        print(f"{'':>4} user: {question}")
        t0 = time.perf_counter()
        for choice, reply in agent_turn(chat, messages):
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            usage = reply["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            print(
                f"{turn:>4} {choice:<11} {usage['prompt_tokens']:>6} {cached:>6} "
                f"{usage['prompt_tokens'] - cached:>9} {seconds:>5.2f}  "
                f"{said(reply['choices'][0]['message'])[:70]}"
            )
    stats = cache.stats()
    print(
        f"\n{stats['cached_tokens']} of {stats['prompt_tokens']} prompt tokens were not prefilled "
        f"({stats['restored_tokens']} restored from the store, the rest still live in the model)"
    )
    cache.close()


if __name__ == "__main__":
    main()
