"""The typer app, its global options, error handling and the helpers every command shares.

Commands live in ``commands.py`` and ``chat.py`` and are registered on ``app`` in ``__init__.py``
(in the order ``--help`` lists them). Errors print as one red line and exit with status 1;
``--verbose`` adds llama.cpp's logs and tracebacks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from .. import config
from ..cache import PrefixCache
from ..errors import ConfigError, PrefixCacheError
from ..prewarm import chat_options
from ..recipes import Recipe, load_recipe
from ..store import Store, open_store

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
    chat_template: str | None = None
    chat_format: str | None = None

    @property
    def quota_bytes(self) -> int | None:
        return None if self.quota_gb is None else int(self.quota_gb * 1e9)


def options(ctx: typer.Context) -> Options:
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
    chat_template_file: Annotated[
        Path | None,
        typer.Option(
            "--chat-template-file",
            exists=True,
            dir_okay=False,
            help="Jinja chat template to render conversations with, for models whose GGUF has"
            " none or a wrong one [default: the GGUF's; a recipe's model section wins].",
            show_default=False,
        ),
    ] = None,
    chat_format: Annotated[
        str | None,
        typer.Option(
            "--chat-format",
            help="A llama-cpp-python chat format instead (gemma, chatml, llama-3, ...).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Pin, prewarm and restore llama.cpp KV prefixes for local LLM agents."""
    if chat_template_file and chat_format:
        raise typer.BadParameter("give --chat-template-file or --chat-format, not both")
    template = str(chat_template_file) if chat_template_file else None
    ctx.obj = Options(store, model, n_ctx, quota_gb, verbose, store_key, template, chat_format)
    for handler in [h for h in log.handlers if isinstance(h, RichHandler)]:
        log.removeHandler(handler)
    log.addHandler(RichHandler(console=err_console, show_path=False, show_time=False))
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def handles_errors(fn: F) -> F:
    """Turn library errors into one red line and exit status 1 (tracebacks only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = next((a for a in [*args, *kwargs.values()] if isinstance(a, typer.Context)), None)
        verbose = options(ctx).verbose if ctx else False
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


def open_store_for(opts: Options) -> Store:
    return open_store(opts.store)


@contextmanager
def open_cache(
    opts: Options,
    model: Path,
    n_ctx: int,
    autosave: bool = True,
    recipes: Sequence[Recipe] = (),
) -> Iterator[PrefixCache]:
    template, chat_format = chat_options(recipes, opts.chat_template, opts.chat_format)
    with console.status(f"loading {model.name}", spinner="dots"):
        cache = PrefixCache.open(
            model,
            opts.store,
            n_ctx=n_ctx,
            verbose=opts.verbose,
            quota_gb=opts.quota_gb,
            autosave=autosave,
            store_key=opts.store_key,  # None: $PREFIXCACHE_STORE_KEY, read by the library
            chat_template=template,
            chat_format=chat_format,
        )
    try:
        yield cache
    finally:
        cache.close()


def find_recipe(spec: str) -> Recipe:
    path = Path(spec)
    if not path.exists() and not path.suffix:
        for candidate in (Path("recipes") / f"{spec}.yaml", Path("recipes") / f"{spec}.yml"):
            if candidate.exists():
                path = candidate
                break
    if not path.exists():
        raise ConfigError(f"no recipe {spec!r}: give a recipe file or a name in ./recipes/")
    return load_recipe(path)
