"""``prefixcache chat``: a REPL (or scripted turns) from a recipe's pinned prefix.

Each turn streams the reply from ``PrefixCache.chat`` and then shows how many prompt tokens came
from the cache and how many were evaluated anew.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ..cache import PrefixCache
from ..prewarm import context_size, group_by_model, prewarm
from ..recipes import Recipe
from .base import console, find_recipe, handles_errors, open_cache, options
from .render import progress_bars, recipe_bar


@handles_errors
def chat_cmd(
    ctx: typer.Context,
    recipe_spec: Annotated[str, typer.Argument(metavar="RECIPE", help="Recipe file or name.")],
    messages: Annotated[
        list[str] | None,
        typer.Option("--message", "-m", help="Say this and exit (repeat for several turns)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Reply length limit.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Chat from a recipe's pinned prefix; shows cached vs newly evaluated tokens per turn."""
    opts = options(ctx)
    recipe = find_recipe(recipe_spec)
    model = next(iter(group_by_model([recipe], opts.model)))
    n_ctx = context_size([recipe], opts.n_ctx)
    with open_cache(opts, model, n_ctx, autosave=recipe.autosave, recipes=[recipe]) as cache:
        with progress_bars() as bars:
            prewarm(cache, recipe, progress=recipe_bar(bars, recipe.name))
        history: list[dict[str, Any]] = list(recipe.messages)
        scripted = list(messages or [])
        interactive = not scripted
        if interactive:
            console.print(f"[dim]chatting with {recipe.name}; an empty line or Ctrl-D ends[/]")
        while True:
            if interactive:
                try:
                    text = console.input("[bold cyan]you>[/] ")
                except EOFError:
                    break
            elif scripted:
                text = scripted.pop(0)
                console.print(f"[bold cyan]you>[/] {text}")
            else:
                break
            if not text.strip():
                break
            history.append({"role": "user", "content": text})
            reply = _chat_turn(cache, recipe, history, max_tokens, temperature)
            history.append({"role": "assistant", "content": reply})


def _chat_turn(
    cache: PrefixCache,
    recipe: Recipe,
    history: list[dict[str, Any]],
    max_tokens: int,
    temperature: float,
) -> str:
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    console.print(f"[bold green]{recipe.name}>[/] ", end="")
    for chunk in cache.chat(
        history,
        tools=recipe.tools or None,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=max_tokens,
        temperature=temperature,
    ):
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
                console.out(piece, end="", highlight=False)
    console.print()
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    prompt = usage.get("prompt_tokens", 0)
    ttft = (first or time.perf_counter()) - t0
    console.print(
        f"[dim]cached {cached} tokens · evaluated {prompt - cached} new · "
        f"first token {ttft:.2f}s · {usage.get('completion_tokens', 0)} generated[/]"
    )
    return "".join(parts)
