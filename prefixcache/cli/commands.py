"""The store and server commands: each maps onto one library call.

prewarm → ``prewarm.prewarm``, status/tree/verify/pin/unpin/rm → ``status``, gc → ``Store.gc`` and
``lifecycle.enforce_quota``, explain → ``PrefixCache.explain``, serve → ``server.serve``. What they
print is formatted in ``render.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text
from rich.tree import Tree

from .. import config
from .. import status as store_status
from ..errors import ConfigError
from ..lifecycle import enforce_quota
from ..prewarm import PrewarmResult, context_size, group_by_model, prewarm
from ..recipes import Recipe, load_recipes, parse_duration
from .base import (
    Options,
    console,
    err_console,
    find_recipe,
    handles_errors,
    log,
    open_cache,
    open_store_for,
    options,
)
from .render import (
    add_branch,
    fmt_duration,
    fmt_size,
    print_explanation,
    print_prewarm,
    print_problems,
    print_status,
    progress_bars,
    recipe_bar,
)


def _prewarm_group(
    opts: Options, model: Path, recipes: list[Recipe], force: bool = False, quiet: bool = False
) -> list[PrewarmResult]:
    """Prewarm recipes that share a model, with one progress bar per recipe evaluated."""
    results = []
    n_ctx = context_size(recipes, opts.n_ctx)
    with open_cache(opts, model, n_ctx, recipes=recipes) as cache, progress_bars(quiet) as bars:
        for recipe in recipes:
            results.append(
                prewarm(cache, recipe, progress=recipe_bar(bars, recipe.name), force=force)
            )
    return results


@handles_errors
def prewarm_cmd(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Recipe files or folders of *.yaml recipes.")],
    force: Annotated[
        bool, typer.Option("--force", help="Pin again even what is stored and current.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Evaluate and store each recipe's prefix, skipping what is stored and current."""
    opts = options(ctx)
    recipes = load_recipes(paths)
    if not recipes:
        raise ConfigError(f"no recipes (*.yaml) found in {', '.join(map(str, paths))}")
    results: list[PrewarmResult] = []
    for model, group in group_by_model(recipes, opts.model).items():
        results += _prewarm_group(opts, model, group, force, quiet=as_json)
    if as_json:
        rows = [
            {**asdict(r), "path": str(r.path), "reused_tokens": r.reused_tokens} for r in results
        ]
        print(json.dumps(rows, indent=2))
        return
    print_prewarm(results)


@handles_errors
def status_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Pinned prefixes, sizes, hits and the store's size against its quota."""
    opts = options(ctx)
    store = open_store_for(opts)
    try:
        report = store_status.collect(store, opts.quota_bytes)
    finally:
        store.close()
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print_status(report)


@handles_errors
def tree_cmd(ctx: typer.Context) -> None:
    """The radix tree of stored segments: shared prefixes are shared branches."""
    store = open_store_for(options(ctx))
    try:
        roots = store_status.tree(store)
        top = Tree(f"[bold]{store.url}[/]")
        for root, nodes in roots.items():
            first = nodes[0].segment
            model = store_status.model_name(store, first.fingerprint)
            ns = f" namespace {first.namespace[:8]}" if first.namespace else ""
            branch = top.add(f"[bold]{model}[/]{ns} [dim]{root[:12]}[/]")
            for node in nodes:
                add_branch(branch, node)
    finally:
        store.close()
    if not roots:
        top.add("[dim](empty)[/]")
    console.print(top)


@handles_errors
def verify_cmd(
    ctx: typer.Context,
    fix: Annotated[
        bool, typer.Option("--fix", help="Remove corrupt segments and their descendants.")
    ] = False,
) -> None:
    """Check the checksum and fingerprint of everything stored."""
    store = open_store_for(options(ctx))
    try:
        checked, problems = store_status.verify(store, fix=fix)
    finally:
        store.close()
    if problems:
        print_problems(problems)
    bad = [p for p in problems if p.kind != "fingerprint"]
    stale = len(problems) - len(bad)
    summary = f"{checked} segments checked: {len(bad)} corrupt or orphaned, {stale} not usable here"
    if bad and not fix:
        err_console.print(
            Text(f"error: {summary}; run verify --fix to remove them", style="red"), soft_wrap=True
        )
        raise typer.Exit(1)
    console.print(summary + (" (removed)" if bad else ""))


@handles_errors
def pin_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A stored prefix (recipe name).")],
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Keep it pinned this long: 90s, 12h, 7d.")
    ] = None,
) -> None:
    """Pin a stored prefix again (after unpin, or when its TTL ran out)."""
    opts = options(ctx)
    seconds = parse_duration(ttl)
    store = open_store_for(opts)
    try:
        if not store_status.repin(store, name, seconds, opts.quota_bytes):
            raise ConfigError(f"no stored prefix called {name!r}: prewarm its recipe first")
    finally:
        store.close()
    console.print(f"pinned {name}" + (f" for {fmt_duration(seconds)}" if seconds else ""))


@handles_errors
def unpin_cmd(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="A pinned prefix.")]
) -> None:
    """Unpin a prefix: its segments stay, as ordinary LRU entries."""
    store = open_store_for(options(ctx))
    try:
        if not store_status.unpin(store, name):
            raise ConfigError(f"no pin called {name!r} (see prefixcache status)")
    finally:
        store.close()
    console.print(f"unpinned {name}")


@handles_errors
def rm_cmd(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Stored prefixes (recipe names).")],
) -> None:
    """Remove stored prefixes and the segments only they use."""
    store = open_store_for(options(ctx))
    try:
        for name in names:
            removal = store_status.remove(store, name)
            if not removal.pins:
                raise ConfigError(f"no stored prefix called {name!r} (see prefixcache status)")
            console.print(
                f"removed {name}: {removal.segments} segments, "
                f"{fmt_size(removal.bytes_freed)} freed"
            )
    finally:
        store.close()


@handles_errors
def gc_cmd(ctx: typer.Context) -> None:
    """Reclaim what interrupted writes left, and evict down to the quota."""
    opts = options(ctx)
    store = open_store_for(opts)
    try:
        report = store.gc()
        eviction = enforce_quota(store, opts.quota_bytes, time.time())
    finally:
        store.close()
    console.print(
        f"gc: {report.orphans} orphaned writes and {report.broken} broken segments removed, "
        f"{fmt_size(report.bytes_freed)} freed; evicted {len(eviction.evicted)} segments "
        f"({fmt_size(eviction.bytes_freed)}); store holds {fmt_size(eviction.total_bytes)}"
    )


@handles_errors
def explain_cmd(
    ctx: typer.Context,
    recipe_spec: Annotated[
        str | None,
        typer.Argument(metavar="[RECIPE]", help="Recipe file or name: its messages and tools."),
    ] = None,
    messages: Annotated[
        list[str] | None,
        typer.Option("--message", "-m", help="A user message after the recipe's (repeatable)."),
    ] = None,
    request_file: Annotated[
        str | None,
        typer.Option(
            "--request",
            help="An OpenAI chat request (JSON: messages, tools) from this file, or - for stdin.",
        ),
    ] = None,
    namespace: Annotated[
        str, typer.Option(help="The namespace to look in (a server tenant's).")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Why a request restores what it does: how far each pin matches, and where and why it
    leaves the nearest stored prefix. Reads the store only (no prefill, nothing written)."""
    opts = options(ctx)
    recipe = find_recipe(recipe_spec) if recipe_spec else None
    if recipe is None and request_file is None:
        raise ConfigError("give a recipe, or a request with --request FILE (- for stdin)")
    if recipe is not None and request_file is not None:
        raise ConfigError("give a recipe or --request, not both")
    body: dict[str, Any] = {}
    if recipe is not None:
        body = {"messages": list(recipe.messages), "tools": list(recipe.tools) or None}
    else:
        body = _read_request(request_file or "-")
    body["messages"] = [
        *body.get("messages", []),
        *({"role": "user", "content": m} for m in messages or []),
    ]
    model = next(iter(group_by_model([recipe] if recipe else [], opts.model)), None)
    model = model or config.resolve_model(opts.model)
    n_ctx = context_size([recipe] if recipe else [], opts.n_ctx)
    recipes = [recipe] if recipe else []
    with open_cache(opts, model, n_ctx, autosave=False, recipes=recipes) as cache:
        explanation = cache.explain(**{**body, "namespace": namespace})
    if as_json:
        console.print_json(json.dumps(explanation.to_dict()))
        return
    print_explanation(explanation)


def _read_request(source: str) -> dict[str, Any]:
    """An OpenAI chat request body from a file or stdin ("-")."""
    try:
        text = typer.get_text_stream("stdin").read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the request {source}: {exc}") from exc
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the request {source} is not JSON: {exc}") from exc
    if not isinstance(body, dict) or "messages" not in body:
        raise ConfigError(f"the request {source} is not a chat request (no messages)")
    return body


@handles_errors
def serve_cmd(
    ctx: typer.Context,
    recipes: Annotated[
        list[Path] | None,
        typer.Option("--recipes", "-r", help="Recipe files or folders to prewarm and watch."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="Require this bearer key (repeatable; one namespace each). Shows in ps: "
            "prefer --api-key-file or $PREFIXCACHE_API_KEYS.",
        ),
    ] = None,
    api_key_files: Annotated[
        list[Path] | None,
        typer.Option(
            "--api-key-file",
            help="File of bearer keys, one a line, # comments (repeatable). "
            "$PREFIXCACHE_API_KEYS adds comma-separated keys.",
        ),
    ] = None,
    recipes_root: Annotated[
        Path | None,
        typer.Option(
            help="Recipes, extends and includes must resolve under this folder "
            "(default: each --recipes folder, or a recipe file's folder).",
        ),
    ] = None,
    no_recipes_root: Annotated[
        bool,
        typer.Option(
            "--no-recipes-root",
            help="Let recipes read any file the server can, as the other commands do.",
        ),
    ] = False,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait; beyond it: HTTP 429.")
    ] = 8,
    watch_interval: Annotated[
        float,
        typer.Option(
            min=0.0, help="Seconds between checks for changed recipe files; 0: only on SIGHUP."
        ),
    ] = 2.0,
    max_tokens_cap: Annotated[
        int,
        typer.Option(
            min=0,
            help="Most tokens a request may generate: more asked is clipped (finish_reason "
            "length), none asked gets this; 0: no cap (up to the context).",
        ),
    ] = 1024,
    prefill_replies: Annotated[
        bool,
        typer.Option(
            help="Prefill each chat reply for its conversation's next turn while the model's "
            "queue is empty.",
        ),
    ] = True,
) -> None:
    """An OpenAI-compatible HTTP server with the prefix cache built in."""
    opts = options(ctx)
    try:
        from ..server import read_api_keys, serve
    except ImportError as exc:
        raise ConfigError(
            f"the server needs its extra: pip install 'prefixcache[server]' ({exc})"
        ) from exc
    if recipes_root is not None and no_recipes_root:
        raise ConfigError("give --recipes-root or --no-recipes-root, not both")
    keys = read_api_keys(api_keys or [], api_key_files or [])
    # A server logs plain timestamped lines (start-up, prewarm progress, reloads), not rich ones.
    for handler in list(log.handlers):
        log.removeHandler(handler)
    plain = logging.StreamHandler()
    plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(plain)
    log.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    serve(
        list(recipes or []),
        model=opts.model,
        store=opts.store,
        host=host,
        port=port,
        api_keys=keys,
        n_ctx=opts.n_ctx,
        max_queue=max_queue,
        quota_gb=opts.quota_gb,
        verbose=opts.verbose,
        watch_interval=watch_interval or None,
        recipes_root=recipes_root,
        confine_recipes=not no_recipes_root,
        store_key=opts.store_key,
        max_tokens_cap=max_tokens_cap or None,
        chat_template=opts.chat_template,
        chat_format=opts.chat_format,
        prefill_replies=prefill_replies,
    )
