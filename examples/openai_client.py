"""The official openai client against ``prefixcache serve``: pinned-prefix speed, no code changes.

Start the server in one terminal (it prewarms the recipes before it listens):

    .venv/bin/prefixcache serve --recipes recipes/ --recipes-root .

then run this in another:

    .venv/bin/python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]

It asks the support bot (recipes/support-bot.yaml) two questions, streaming the second, and
prints how many prompt tokens the server restored instead of prefilling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import openai

from prefixcache.recipes import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "support-bot.yaml"


def recipe_prefix() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The support bot's messages and tools: what its agent sends at the start of every call."""
    recipe = load_recipe(RECIPE)
    return list(recipe.messages), recipe.tools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="if the server was given --api-key")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    prefix, tools = recipe_prefix()

    question = {"role": "user", "content": "Hi, where is my order BB-10422? I'm ann@example.com"}
    t0 = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[*prefix, question], tools=tools, max_tokens=64, temperature=0
    )
    usage = reply.usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    print(
        f"[{time.perf_counter() - t0:.2f}s, {cached} of {usage.prompt_tokens} prompt tokens cached]"
    )
    print(reply.choices[0].message.content, "\n")

    follow_up = {"role": "user", "content": "Can I still change the delivery address?"}
    history = [*prefix, question, reply.choices[0].message.model_dump(exclude_none=True), follow_up]
    t0 = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=history,
        tools=tools,
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage and chunk.usage.prompt_tokens_details:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
            print(
                f"\n[first token after {first or 0:.2f}s, {cached} of "
                f"{chunk.usage.prompt_tokens} prompt tokens cached]"
            )


if __name__ == "__main__":
    main()
