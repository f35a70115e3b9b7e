"""The ``prefixcache`` command: a thin typer + rich layer over the library.

Every command maps onto one library call (prewarm → ``prewarm.prewarm``, status/tree/verify/rm →
``status``, chat → ``PrefixCache.chat``, explain → ``PrefixCache.explain``, serve →
``server.serve``). Errors print as one red line and exit with status 1; ``--verbose`` adds
llama.cpp's logs and tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from . import config
from . import status as store_status
from .cache import Calibration, PrefixCache
from .errors import ConfigError, PrefixCacheError
from .explain import Explanation
from .lifecycle import enforce_quota
from .prewarm import PrewarmResult, context_size, group_by_model, prewarm
from .recipes import Recipe, load_recipe, load_recipes, parse_duration
from .store import Store, open_store

app = typer.Typer(
    name="prefixcache",
    help="Pin, prewarm and restore llama.cpp KV prefixes for local LLM agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("prefixcache")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Options:
    store: str | None = None
    model: str | None = None
    n_ctx: int | None = None
    quota_gb: float | None = None
    verbose: bool = False
    store_key: str | None = None

    @property
    def quota_bytes(self) -> int | None:
        return None if self.quota_gb is None else int(self.quota_gb * 1e9)


def _options(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Options) else Options()


@app.callback()
def main(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            envvar=config.STORE_ENV,
            help="Store directory or redis:// URL [default: the user cache dir].",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            envvar=config.MODEL_ENV,
            help="GGUF model for recipes that name none [default: bundled SmolLM2].",
            show_default=False,
        ),
    ] = None,
    n_ctx: Annotated[
        int | None,
        typer.Option("--n-ctx", min=16, help="Context size [default: the recipes' n_ctx, 8192]."),
    ] = None,
    quota_gb: Annotated[
        float | None,
        typer.Option(
            "--quota-gb",
            envvar="PREFIXCACHE_QUOTA_GB",
            min=0.0,
            help="Store size limit; unpinned segments are evicted LRU beyond it.",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show llama.cpp logs and tracebacks.")
    ] = False,
    store_key: Annotated[
        str | None,
        typer.Option(
            "--store-key",
            envvar=config.STORE_KEY_ENV,
            help="Secret that signs stored segments and refuses unsigned ones (docs/security.md);"
            " prefer the env var: argv shows in ps.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Pin, prewarm and restore llama.cpp KV prefixes for local LLM agents."""
    ctx.obj = Options(store, model, n_ctx, quota_gb, verbose, store_key)
    for handler in [h for h in log.handlers if isinstance(h, RichHandler)]:
        log.removeHandler(handler)
    log.addHandler(RichHandler(console=err_console, show_path=False, show_time=False))
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _handles_errors(fn: F) -> F:
    """Turn library errors into one red line and exit status 1 (tracebacks only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = next((a for a in [*args, *kwargs.values()] if isinstance(a, typer.Context)), None)
        verbose = _options(ctx).verbose if ctx else False
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except PrefixCacheError as exc:
            if verbose:
                err_console.print_exception()
            err_console.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            if verbose:
                err_console.print_exception()
            err_console.print(
                Text(f"error: {type(exc).__name__}: {exc} (run with -v for details)", style="red"),
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# --- shared helpers ----------------------------------------------------------------------------


def _open_store(opts: Options) -> Store:
    return open_store(opts.store)


@contextmanager
def _cache(opts: Options, model: Path, n_ctx: int, autosave: bool = True) -> Iterator[PrefixCache]:
    with console.status(f"loading {model.name}", spinner="dots"):
        cache = PrefixCache.open(
            model,
            opts.store,
            n_ctx=n_ctx,
            verbose=opts.verbose,
            quota_gb=opts.quota_gb,
            autosave=autosave,
            store_key=opts.store_key,  # None: $PREFIXCACHE_STORE_KEY, read by the library
        )
    try:
        yield cache
    finally:
        cache.close()


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


def _ago(when: float | None) -> str:
    return "—" if not when else _duration(max(0.0, time.time() - when)) + " ago"


class _TokenRate(ProgressColumn):
    """Tokens per second of a progress task."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.0f} tok/s", style="progress.data.speed")


def _progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        _TokenRate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=quiet,
    )


def _prewarm_group(
    opts: Options, model: Path, recipes: list[Recipe], force: bool = False, quiet: bool = False
) -> list[PrewarmResult]:
    """Prewarm recipes that share a model, with one progress bar per recipe evaluated."""
    results = []
    n_ctx = context_size(recipes, opts.n_ctx)
    with _cache(opts, model, n_ctx) as cache, _progress(quiet) as bars:
        for recipe in recipes:
            results.append(prewarm(cache, recipe, progress=_bar(bars, recipe.name), force=force))
    return results


def _bar(bars: Progress, name: str) -> Callable[[int, int], None]:
    """A prewarm progress callback that adds its bar on first use (skipped recipes get none)."""
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bars.add_task(name, total=total)
        bars.update(task, completed=done, total=total)

    return advance


# --- commands ----------------------------------------------------------------------------------


@app.command("prewarm")
@_handles_errors
def prewarm_cmd(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Recipe files or folders of *.yaml recipes.")],
    force: Annotated[
        bool, typer.Option("--force", help="Pin again even what is stored and current.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Evaluate and store each recipe's prefix, skipping what is stored and current."""
    opts = _options(ctx)
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
    table = Table(title="prewarm", title_justify="left")
    table.add_column("recipe", no_wrap=True)
    for col in ("tokens", "evaluated", "reused", "stored now", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for r in results:
        state = "current" if r.skipped else ("stored" if r.evaluated_tokens else "restored")
        table.add_row(
            r.recipe,
            str(r.n_tokens),
            str(r.evaluated_tokens),
            str(r.reused_tokens),
            f"{_size(r.new_bytes)} ({r.new_segments} seg)",
            f"{r.seconds:.1f}s",
            state if r.pinned else state + " (unpinned)",
        )
    console.print(table)


@app.command("status")
@_handles_errors
def status_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Pinned prefixes, sizes, hits and the store's size against its quota."""
    opts = _options(ctx)
    store = _open_store(opts)
    try:
        report = store_status.collect(store, opts.quota_bytes)
    finally:
        store.close()
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    models = sorted({row.model for row in report.pins})
    title = f"prefixcache store: {report.url}"
    if len(models) == 1:
        title += f" · model {models[0]}"
    table = Table(title=title, title_justify="left")
    table.add_column("recipe", no_wrap=True)
    for col in ("tokens", "bytes", "pinned", "TTL left", "hits", "last used"):
        table.add_column(col, justify="right", no_wrap=True)
    if len(models) > 1:
        table.add_column("model", no_wrap=True)
    for row in report.pins:
        name = row.name if not row.namespace else f"{row.name} [dim]({row.namespace[:8]})[/]"
        cells = [
            name if row.stored else f"{name} [red](evicted)[/]",
            str(row.tokens),
            _size(row.bytes),
            "yes" if row.pinned else "[yellow]expired[/]",
            _duration(row.ttl_left_s) if row.pinned else "—",
            str(row.hits),
            _ago(row.last_used),
        ]
        table.add_row(*cells, *([row.model] if len(models) > 1 else []))
    quota = "no quota" if report.quota_bytes is None else f"quota {_size(report.quota_bytes)}"
    table.caption = (
        f"{report.segments} segments, {report.tokens} tokens, {_size(report.bytes)} "
        f"({_size(report.pinned_bytes)} pinned, {_size(report.autosaved_bytes)} in "
        f"{report.autosaved_segments} unpinned) · {quota}"
        + (f" · {report.quarantined} quarantined" if report.quarantined else "")
    )
    table.caption_justify = "left"
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")
    if report.models:
        figures = Table(title="cost model, measured on this machine", title_justify="left")
        figures.add_column("model", overflow="fold")
        for col in ("prefill", "restore", "KV/token", "min span saved"):
            figures.add_column(col, justify="right", no_wrap=True)
        for m in report.models:
            cal = Calibration(
                prefill_tokens_per_s=m.prefill_tokens_per_s,
                restore_bytes_per_s=m.restore_bytes_per_s,
                bytes_per_token=m.bytes_per_token,
            )
            figures.add_row(
                m.model,
                f"{m.prefill_tokens_per_s:.0f} tok/s" if m.prefill_tokens_per_s else "—",
                f"{m.restore_bytes_per_s / 1e9:.2f} GB/s" if m.restore_bytes_per_s else "—",
                _size(m.bytes_per_token) if m.bytes_per_token else "—",
                f"{cal.min_span_tokens()} tokens",
            )
        console.print(figures)


@app.command("tree")
@_handles_errors
def tree_cmd(ctx: typer.Context) -> None:
    """The radix tree of stored segments: shared prefixes are shared branches."""
    store = _open_store(_options(ctx))
    try:
        roots = store_status.tree(store)
        top = Tree(f"[bold]{store.url}[/]")
        for root, nodes in roots.items():
            first = nodes[0].segment
            model = store_status.model_name(store, first.fingerprint)
            ns = f" namespace {first.namespace[:8]}" if first.namespace else ""
            branch = top.add(f"[bold]{model}[/]{ns} [dim]{root[:12]}[/]")
            for node in nodes:
                _add_branch(branch, node)
    finally:
        store.close()
    if not roots:
        top.add("[dim](empty)[/]")
    console.print(top)


def _add_branch(parent: Tree, node: store_status.TreeNode) -> None:
    seg = node.segment
    pins = f" [green]📌 {', '.join(node.pins)}[/]" if node.pins else ""
    label = f" [dim]{seg.label}[/]" if seg.label and not node.pins else ""
    branch = parent.add(
        f"[{seg.start}, {seg.end}) {len(seg.tokens)} tok · {_size(seg.nbytes)} · "
        f"{node.hits} hits{pins}{label}"
    )
    for child in node.children:
        _add_branch(branch, child)


@app.command("verify")
@_handles_errors
def verify_cmd(
    ctx: typer.Context,
    fix: Annotated[
        bool, typer.Option("--fix", help="Remove corrupt segments and their descendants.")
    ] = False,
) -> None:
    """Check the checksum and fingerprint of everything stored."""
    store = _open_store(_options(ctx))
    try:
        checked, problems = store_status.verify(store, fix=fix)
    finally:
        store.close()
    if problems:
        table = Table(title="problems", title_justify="left")
        for col in ("segment", "label", "problem", "detail"):
            table.add_column(col)
        for p in problems:
            table.add_row(p.key[:16], p.label, p.kind, p.detail)
        console.print(table)
    bad = [p for p in problems if p.kind != "fingerprint"]
    stale = len(problems) - len(bad)
    summary = f"{checked} segments checked: {len(bad)} corrupt or orphaned, {stale} not usable here"
    if bad and not fix:
        err_console.print(
            Text(f"error: {summary}; run verify --fix to remove them", style="red"), soft_wrap=True
        )
        raise typer.Exit(1)
    console.print(summary + (" (removed)" if bad else ""))


@app.command("pin")
@_handles_errors
def pin_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A stored prefix (recipe name).")],
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Keep it pinned this long: 90s, 12h, 7d.")
    ] = None,
) -> None:
    """Pin a stored prefix again (after unpin, or when its TTL ran out)."""
    opts = _options(ctx)
    seconds = parse_duration(ttl)
    store = _open_store(opts)
    try:
        if not store_status.repin(store, name, seconds, opts.quota_bytes):
            raise ConfigError(f"no stored prefix called {name!r}: prewarm its recipe first")
    finally:
        store.close()
    console.print(f"pinned {name}" + (f" for {_duration(seconds)}" if seconds else ""))


@app.command("unpin")
@_handles_errors
def unpin_cmd(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="A pinned prefix.")]
) -> None:
    """Unpin a prefix: its segments stay, as ordinary LRU entries."""
    store = _open_store(_options(ctx))
    try:
        if not store_status.unpin(store, name):
            raise ConfigError(f"no pin called {name!r} (see prefixcache status)")
    finally:
        store.close()
    console.print(f"unpinned {name}")


@app.command("rm")
@_handles_errors
def rm_cmd(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Stored prefixes (recipe names).")],
) -> None:
    """Remove stored prefixes and the segments only they use."""
    store = _open_store(_options(ctx))
    try:
        for name in names:
            removal = store_status.remove(store, name)
            if not removal.pins:
                raise ConfigError(f"no stored prefix called {name!r} (see prefixcache status)")
            console.print(
                f"removed {name}: {removal.segments} segments, {_size(removal.bytes_freed)} freed"
            )
    finally:
        store.close()


@app.command("gc")
@_handles_errors
def gc_cmd(ctx: typer.Context) -> None:
    """Reclaim what interrupted writes left, and evict down to the quota."""
    opts = _options(ctx)
    store = _open_store(opts)
    try:
        report = store.gc()
        eviction = enforce_quota(store, opts.quota_bytes, time.time())
    finally:
        store.close()
    console.print(
        f"gc: {report.orphans} orphaned writes and {report.broken} broken segments removed, "
        f"{_size(report.bytes_freed)} freed; evicted {len(eviction.evicted)} segments "
        f"({_size(eviction.bytes_freed)}); store holds {_size(eviction.total_bytes)}"
    )


def _find_recipe(spec: str) -> Recipe:
    path = Path(spec)
    if not path.exists() and not path.suffix:
        for candidate in (Path("recipes") / f"{spec}.yaml", Path("recipes") / f"{spec}.yml"):
            if candidate.exists():
                path = candidate
                break
    if not path.exists():
        raise ConfigError(f"no recipe {spec!r}: give a recipe file or a name in ./recipes/")
    return load_recipe(path)


@app.command("chat")
@_handles_errors
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
    opts = _options(ctx)
    recipe = _find_recipe(recipe_spec)
    model = next(iter(group_by_model([recipe], opts.model)))
    n_ctx = context_size([recipe], opts.n_ctx)
    with _cache(opts, model, n_ctx, autosave=recipe.autosave) as cache:
        with _progress() as bars:
            prewarm(cache, recipe, progress=_bar(bars, recipe.name))
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


@app.command("explain")
@_handles_errors
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
    opts = _options(ctx)
    recipe = _find_recipe(recipe_spec) if recipe_spec else None
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
    with _cache(opts, model, n_ctx, autosave=False) as cache:
        explanation = cache.explain(**{**body, "namespace": namespace})
    if as_json:
        console.print_json(json.dumps(explanation.to_dict()))
        return
    _print_explanation(explanation)


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


def _shown(text: str) -> Text:
    """Decoded prompt text with its newlines and tabs visible, never read as rich markup."""
    return Text(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t"))


def _print_explanation(e: Explanation) -> None:
    """The reason line, the divergence (position and text on both sides), then the pins."""
    console.print(Text(e.reason), soft_wrap=True)
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("prompt tokens", str(e.prompt_tokens))
    table.add_row("stored", f"{e.matched_tokens} ({e.kind})")
    d = e.divergence
    if d is not None:
        left = f"pin {d.pin}" if d.pin is not None else "a stored prefix (not pinned)"
        table.add_row("leaves", f"{left} at token {d.at} of {d.of}")
        table.add_row(
            "stored text",
            Text.assemble(_shown(e.before), ("⟩", "bold"), _shown(e.stored_after), style="green"),
        )
        table.add_row(
            "request text",
            Text.assemble(_shown(e.before), ("⟩", "bold"), _shown(e.request_after), style="red"),
        )
    console.print(table)
    if e.pins:
        pins = Table(title="pins, nearest first")
        pins.add_column("pin", no_wrap=True)
        pins.add_column("tokens", justify="right")
        pins.add_column("matched", justify="right")
        pins.add_column("")
        for p in e.pins:
            state = "whole" if p.whole else f"differs from token {p.matched}"
            pins.add_row(p.name, str(p.n_tokens), str(p.matched), state)
        console.print(pins)


@app.command("serve")
@_handles_errors
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
) -> None:
    """An OpenAI-compatible HTTP server with the prefix cache built in."""
    opts = _options(ctx)
    try:
        from .server import read_api_keys, serve
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
    )


if __name__ == "__main__":
    app()
