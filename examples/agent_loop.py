"""A multi-turn, tool-using agent loop on a pinned prefix, printing cached vs prefilled tokens.

Run: python examples/agent_loop.py [--store DIR] [--turns N]

The system prompt and tool schemas are pinned once; every turn then restores everything the
store holds for the conversation so far and prefills only what is new.
"""

from __future__ import annotations

import argparse
import json
import time
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
    ("Where is order 1042?", "lookup_order", {"order_id": "1042"}, {"status": "shipped"}),
    ("Do you have SKU H-200 hammers?", "stock_level", {"sku": "H-200"}, {"units": 14}),
    ("And order 1043?", "lookup_order", {"order_id": "1043"}, {"status": "packing"}),
    ("How many S-10 saws?", "stock_level", {"sku": "S-10"}, {"units": 0}),
    ("Is order 1050 late?", "lookup_order", {"order_id": "1050"}, {"status": "delivered"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store path (default: the user cache)")
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    args = parser.parse_args()

    cache = PrefixCache.open(store=args.store, n_ctx=4096)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    info = cache.pin(messages, name="agent-loop-example", tools=TOOLS)
    print(f"pinned {info.n_tokens} tokens ({info.evaluated_tokens} prefilled now)\n")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'seconds':>8}  reply")
    for turn, (question, tool, arguments, result) in enumerate(QUESTIONS[: args.turns], 1):
        messages.append({"role": "user", "content": question})
        # The agent calls a tool (scripted here, so the example runs the same every time)...
        call = json.dumps({"name": tool, "arguments": arguments})
        messages.append({"role": "assistant", "content": call})
        messages.append({"role": "tool", "content": json.dumps(result), "tool_call_id": tool})
        # ...and the model answers from the tool's result.
        t0 = time.perf_counter()
        reply = cache.chat(messages, tools=TOOLS, max_tokens=32, temperature=0)
        seconds = time.perf_counter() - t0
        usage = reply["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        content = reply["choices"][0]["message"]["content"] or ""
        print(
            f"{turn:>4} {usage['prompt_tokens']:>7} {cached:>7} "
            f"{usage['prompt_tokens'] - cached:>9} {seconds:>8.2f}  {content.strip()[:60]!r}"
        )
        messages.append({"role": "assistant", "content": content})
    stats = cache.stats()
    print(
        f"\n{stats['cached_tokens']} of {stats['prompt_tokens']} prompt tokens were not prefilled "
        f"({stats['restored_tokens']} restored from the store, the rest still live in the model)"
    )


if __name__ == "__main__":
    main()
