"""The server's state behind the HTTP app: its models, their recipes, its keys, and reloads.

Each model is a :class:`~prefixcache.server.worker.ModelWorker`. A reload (SIGHUP, or a changed
recipe file) loads the recipes again, unpins what no recipe defines any more, prewarms what
changed, and unloads the models no recipe uses. It runs on a thread of its own while the event
loop serves requests, so ``Server.workers`` is copy-on-write: a new mapping replaces the old one,
and a mapping once published is never changed, so the event loop may read and iterate whichever
one it holds without a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from fastapi import Request

from ..cache import PrefixCache
from ..config import resolve_model
from ..errors import PrefixCacheError
from ..prewarm import chat_options, context_size, group_by_model, prewarm
from ..recipes import Recipe, load_recipes, watched_paths
from .apimetrics import APICacheCounters
from .auth import ApiKeys, namespace_for
from .reload import RecipeWatcher, stale_pins
from .schema import APIError
from .worker import ModelWorker

log = logging.getLogger(__name__)

#: Seconds between checks of the recipe files for changes.
DEFAULT_WATCH_INTERVAL = 2.0

#: The most tokens one request may generate unless the server is told otherwise: one decode
#: runs at a time per model, so a request without max_tokens (up to n_ctx tokens) would make
#: every other agent wait for it.
DEFAULT_MAX_TOKENS_CAP = 1024


@dataclass
class ServerConfig:
    """What ``prefixcache serve`` was asked for.

    Recipes are confined by default (``confine_recipes``): every recipe file, parent and included
    file must resolve, after symlinks, under ``recipes_root``, or when that is None under the
    folder of the recipe path it was loaded from (a named folder, or a named file's folder).
    """

    recipe_paths: list[Path] = field(default_factory=list)
    model: str | None = None
    store: str | None = None
    n_ctx: int | None = None
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 8
    quota_gb: float | None = None
    verbose: bool = False
    watch_interval: float | None = DEFAULT_WATCH_INTERVAL
    recipes_root: Path | None = None
    confine_recipes: bool = True
    #: The store secret (docs/security.md); None: ``$PREFIXCACHE_STORE_KEY``, if set.
    store_key: str | None = None
    #: The most tokens a request generates (more asked: clipped, ``finish_reason: "length"``);
    #: also the default for requests that give no ``max_tokens``. None or 0: no cap.
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP
    #: The chat template (Jinja text or file) or llama-cpp-python format for models whose
    #: recipes name none in their model section (None: the GGUF's template).
    chat_template: str | None = None
    chat_format: str | None = None
    #: Prefill each reply for its conversation's next turn while the model's queue is empty.
    prefill_replies: bool = True

    def recipe_roots(self) -> list[Path] | None:
        """The folders recipes may read from, or None for anywhere."""
        if not self.confine_recipes:
            return None
        if self.recipes_root is not None:
            return [self.recipes_root.resolve()]
        return [p.resolve() if p.is_dir() else p.resolve().parent for p in self.recipe_paths]


def model_id(model: Path) -> str:
    """The id clients name a model by: its file name without ``.gguf``."""
    return model.name.removesuffix(".gguf")


def model_names(workers: Mapping[str, ModelWorker]) -> dict[str, tuple[str, Recipe]]:
    """The other names clients may give as ``model``: each recipe's name and aliases, mapped to
    (the id of the model the recipe runs on, the recipe).

    A model id always means its model: a recipe name or alias that is also a model id is left
    out (with a warning when the two models differ).
    """
    names: dict[str, tuple[str, Recipe]] = {}
    for worker in workers.values():
        for recipe in worker.recipes:
            for name in (recipe.name, *recipe.aliases):
                if name in workers:
                    if name != worker.id:
                        log.warning(
                            "recipe %s: the model name %r means the model %s, not %s",
                            recipe.name,
                            name,
                            name,
                            worker.id,
                        )
                    continue
                names[name] = (worker.id, recipe)
    return names


class Server:
    """The models, their recipes and the reload machinery behind the HTTP app."""

    def __init__(self, config: ServerConfig):
        self.config = config
        #: Model id → worker. Copy-on-write: replaced whole under the reload lock, never changed.
        self.workers: Mapping[str, ModelWorker] = MappingProxyType({})
        #: Recipe name or alias → (model id, recipe); copy-on-write like ``workers``.
        self.names: Mapping[str, tuple[str, Recipe]] = MappingProxyType({})
        self.keys = ApiKeys(config.api_keys)
        self.started = time.time()
        self.reloads = 0
        self._requests: dict[tuple[str, int], int] = {}
        self._requests_lock = threading.Lock()
        #: Cache reads and writes by API, for /metrics (each API's routes record their calls).
        self.api_cache = APICacheCounters()
        self._reload_lock = threading.Lock()
        self._sources: set[str] = set()  # recipe files of the last good load
        self.watcher = RecipeWatcher(
            config.recipe_paths, config.watch_interval, lambda: self.reload("a recipe file changed")
        )

    @property
    def namespaces(self) -> list[str]:
        return [namespace_for(k) for k in self.config.api_keys] or [""]

    # models and recipes --------------------------------------------------------------------

    def start(self) -> None:
        """Load the models and prewarm every recipe (before the server listens)."""
        with self._reload_lock:
            self._apply(self._load_recipes())

    def reload(self, reason: str) -> bool:
        """Load the recipes again and prewarm what changed; keep the old ones on a bad recipe."""
        with self._reload_lock:
            try:
                recipes = self._load_recipes()
                self._apply(recipes)
            except PrefixCacheError as exc:
                log.error("reload (%s) failed, serving the previous recipes: %s", reason, exc)
                return False
            self.reloads += 1
            log.info("recipes reloaded (%s): %d recipes", reason, len(recipes))
            return True

    def _load_recipes(self) -> list[Recipe]:
        paths = self.config.recipe_paths
        return load_recipes(paths, root=self.config.recipe_roots()) if paths else []

    def _apply(self, recipes: list[Recipe]) -> None:
        """Make the models serve ``recipes``: unpin what they no longer define, prewarm them
        (loading models not loaded yet), unload the models none of them uses, watch them.

        With no recipes, the default model is served.
        """
        groups = group_by_model(recipes, self.config.model) if recipes else {}
        if not groups:
            groups = {resolve_model(self.config.model): []}
        wanted = {model_id(model): group for model, group in groups.items()}
        workers = [(self._worker_for(model, group), group) for model, group in groups.items()]
        # Stale pins go before prewarming: they hold quota that the new pins may need.
        self._unpin_stale(wanted, recipes)
        for worker, group in workers:
            self._prewarm(worker, group)
            worker.recipes = group
        self._unload([w for w in self.workers.values() if w.id not in wanted])
        self.names = MappingProxyType(model_names(self.workers))
        self._sources = {str(r.path) for r in recipes}
        self.watcher.watch(watched_paths(recipes))

    def _worker_for(self, model: Path, recipes: list[Recipe]) -> ModelWorker:
        worker = self.workers.get(model_id(model))
        if worker is None:
            n_ctx = context_size(recipes, self.config.n_ctx)
            log.info("loading %s (n_ctx %d)", model.name, n_ctx)
            template, chat_format = chat_options(
                recipes, self.config.chat_template, self.config.chat_format
            )
            cache = PrefixCache.open(
                model,
                self.config.store,
                n_ctx=n_ctx,
                verbose=self.config.verbose,
                quota_gb=self.config.quota_gb,
                store_key=self.config.store_key,
                chat_template=template,
                chat_format=chat_format,
                prefill_replies=self.config.prefill_replies,
            )
            worker = ModelWorker(model_id(model), cache, self.config.max_queue)
            self.workers = MappingProxyType({**self.workers, worker.id: worker})
        return worker

    def _unload(self, workers: Sequence[ModelWorker]) -> None:
        """Stop serving ``workers``' models and close them once their queued calls are done."""
        if not workers:
            return
        gone = {w.id for w in workers}
        self.workers = MappingProxyType({k: w for k, w in self.workers.items() if k not in gone})
        for worker in workers:
            log.info("unloading %s: no recipe uses it any more", worker.id)
            worker.close(cancel=False)

    def _prewarm(self, worker: ModelWorker, recipes: Sequence[Recipe]) -> None:
        """Prewarm on the model's thread (after the calls already queued), and wait for it."""

        def job() -> None:
            for recipe in recipes:
                for ns in self.namespaces:
                    result = prewarm(
                        worker.cache, recipe, progress=_progress_log(recipe.name), namespace=ns
                    )
                    state = "current" if result.skipped else f"{result.evaluated_tokens} evaluated"
                    log.info(
                        "recipe %s: %d tokens pinned (%s, %.1fs)",
                        recipe.name,
                        result.n_tokens,
                        state,
                        result.seconds,
                    )

        worker.submit(job, admit=False).result()

    def _unpin_stale(self, wanted: Mapping[str, list[Recipe]], recipes: list[Recipe]) -> None:
        """Unpin, on every loaded model and in every namespace, the pins of this server's recipes
        that ``wanted`` (model id → its recipes) no longer defines: deleted or renamed recipes,
        and recipes that moved to another model."""
        manages = self._manager(recipes)
        for worker in self.workers.values():
            defined = {(str(r.path), r.name) for r in wanted.get(worker.id, [])}

            def job(worker: ModelWorker = worker, defined: set[tuple[str, str]] = defined) -> None:
                for ns in self.namespaces:
                    for pin in stale_pins(worker.cache.pins(ns), defined, manages):
                        worker.cache.unpin(pin.name, namespace=ns)
                        log.info(
                            "recipe %s (%s) is gone from %s: unpinned",
                            pin.name,
                            pin.source,
                            worker.id,
                        )

            worker.submit(job, admit=False).result()

    def _manager(self, recipes: list[Recipe]) -> Callable[[str], bool]:
        """Whether a pin's source is a recipe file this server answers for: one it loaded last
        time or now, a recipe file it was given, or a file directly in a recipe folder given."""
        sources = self._sources | {str(r.path) for r in recipes}
        files = {p.resolve() for p in self.config.recipe_paths if not p.is_dir()}
        folders = {p.resolve() for p in self.config.recipe_paths if p.is_dir()}

        def manages(source: str) -> bool:
            if not source:
                return False
            path = Path(source)
            return source in sources or path in files or path.parent in folders

        return manages

    def close(self) -> None:
        self.watcher.stop()
        for worker in self.workers.values():
            worker.close()

    # requests ------------------------------------------------------------------------------

    def worker(self, model: str) -> ModelWorker:
        """The worker a request's ``model`` names: a model id (the GGUF file's stem), or the
        name or an alias of a recipe, which stands for the model that recipe runs on."""
        workers = self.workers
        worker = workers.get(model)
        if worker is None and model in self.names:
            worker = workers.get(self.names[model][0])
        if worker is None:
            known = ", ".join(sorted(workers)) + "".join(f", {name}" for name in sorted(self.names))
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server has: {known}",
                code="model_not_found",
                param="model",
            )
        return worker

    def recipe_for(self, model: str) -> Recipe | None:
        """The recipe a request's ``model`` names by its name or an alias, if it does."""
        entry = self.names.get(model)
        return entry[1] if entry is not None else None

    def authenticated(self, request: Request) -> str | None:
        """The request's namespace if its key is valid ("" without keys), else None."""
        if not self.keys:
            return ""
        key = self.keys.from_header(request.headers.get("authorization", ""))
        return None if key is None else namespace_for(key)

    def namespace(self, request: Request) -> str:
        """The request's namespace; 401 without a valid key when keys are configured."""
        ns = self.authenticated(request)
        if ns is None:
            raise APIError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                kind="authentication_error",
                code="invalid_api_key",
            )
        return ns

    def count(self, endpoint: str, status: int) -> None:
        with self._requests_lock:
            self._requests[(endpoint, status)] = self._requests.get((endpoint, status), 0) + 1

    def request_counts(self) -> dict[tuple[str, int], int]:
        """A copy of the request counters (read from the metrics thread)."""
        with self._requests_lock:
            return dict(self._requests)


def _progress_log(name: str) -> Callable[[int, int], None]:
    """A prewarm progress callback that logs about every tenth of the way."""
    t0 = time.perf_counter()
    step = [0]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(1, total)
        if tenth > step[0] or done == total:
            step[0] = tenth
            rate = done / max(1e-9, time.perf_counter() - t0)
            log.info("prewarm %s: %d/%d tokens (%.0f tok/s)", name, done, total, rate)

    return report


__all__ = [
    "DEFAULT_MAX_TOKENS_CAP",
    "DEFAULT_WATCH_INTERVAL",
    "Server",
    "ServerConfig",
    "model_id",
    "model_names",
]
