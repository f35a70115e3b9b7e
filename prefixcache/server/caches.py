"""Named caches over HTTP: ``/v1/caches``, the server's face of ``prefixcache`` pin, unpin, rm
and status.

A named cache is a pin: a stored prefix kept from eviction (for a TTL, or for good). A tenant
creates one from a recipe (JSON or YAML text) or from messages + tools, lists and reads its own,
changes its TTL or unpins it (``PATCH``), and removes it (``DELETE``), through the same library
calls as the CLI (:func:`prefixcache.status.collect`, ``repin``, ``unpin``, ``remove``) on a view
of the store that holds only the tenant's pins. The recipes the server was started with
(``--recipes``) are listed too, read-only: they change by editing their files.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .. import status as store_status
from ..errors import QuotaExceededError, RecipeError
from ..prewarm import recipe_tokens
from ..recipes import Recipe, load_recipe, parse_duration
from ..request import RequestError, normalise_chat
from ..segment import Pin
from ..store import Store
from .core import Server
from .schema import APIError, api_error
from .worker import ModelWorker

#: The ``source`` of the pins made here (``prefixcache status`` shows it).
SOURCE = "http"
_NAME_HELP = "letters, digits, '_', '.' or '-'"


class CacheCreate(BaseModel):
    """``POST /v1/caches``: a ``recipe`` (a JSON object, or YAML or JSON text), or ``messages``
    (+ ``tools``) with a ``name``; ``ttl`` (seconds or 90s, 30m, 12h, 7d; default the recipe's,
    else none) and ``pinned`` (false: stored as ordinary LRU entries)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None
    recipe: str | dict[str, Any] | None = None
    messages: list[Any] | None = None
    tools: list[Any] | None = None
    ttl: str | float | None = None
    pinned: bool = True


class CachePatch(BaseModel):
    """``PATCH /v1/caches/{name}``: ``ttl`` pins it again for that long (null: for good),
    ``pinned: false`` unpins it (its segments become ordinary LRU entries)."""

    model_config = ConfigDict(extra="forbid")

    ttl: str | float | None = None
    pinned: bool | None = None


class _TenantStore:
    """The store as one tenant sees it: only the pins under its roots (one per model), so that
    the CLI's functions, which act on every pin of a name, act on this tenant's only."""

    def __init__(self, store: Store, roots: set[str]):
        self._store = store
        self._roots = roots

    def pins(self) -> list[Pin]:
        return [p for p in self._store.pins() if p.root in self._roots]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _ttl(value: str | float | None) -> float | None:
    try:
        return parse_duration(value)
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"ttl: {exc}", param="ttl") from None


class Caches:
    """The named caches of the server's tenants."""

    def __init__(self, server: Server):
        self.server = server

    def _view(self, ns: str) -> Store:
        workers = list(self.server.workers.values())
        roots = {w.cache.root(ns) for w in workers}
        return cast(Store, _TenantStore(workers[0].cache.store, roots))

    def _recipe_sources(self) -> set[str]:
        return {str(r.path) for w in self.server.workers.values() for r in w.recipes}

    def _quota(self) -> int | None:
        return next(iter(self.server.workers.values())).cache.quota_bytes

    def list(self, ns: str) -> list[dict[str, Any]]:
        """The tenant's caches, as ``prefixcache status`` reports them."""
        report = store_status.collect(self._view(ns), self._quota())
        sources = self._recipe_sources()
        now = time.time()
        return [_describe(row, row.source in sources, now) for row in report.pins]

    def get(self, ns: str, name: str) -> dict[str, Any]:
        for cache in self.list(ns):
            if cache["name"] == name:
                return cache
        raise APIError(
            404,
            f"no cache called {name!r} (GET /v1/caches lists them; POST /v1/caches makes one)",
            code="cache_not_found",
        )

    def writable(self, ns: str, name: str) -> dict[str, Any]:
        cache = self.get(ns, name)
        if cache["read_only"]:
            raise APIError(
                403,
                f"the cache {name!r} is a recipe the server was started with (--recipes): it is "
                "read-only here; edit or delete its recipe file (the server reloads it), or "
                "create a cache of another name",
                kind="permission_error",
                code="cache_read_only",
            )
        return cache

    def patch(self, ns: str, name: str, change: CachePatch) -> dict[str, Any]:
        self.writable(ns, name)
        given = change.model_fields_set
        if not given:
            raise APIError(400, "give ttl (to pin for that long; null: for good) or pinned")
        if change.pinned is False:
            if "ttl" in given:
                raise APIError(400, "pinned: false takes no ttl (an unpinned cache never expires)")
            store_status.unpin(self._view(ns), name)
        else:
            try:
                store_status.repin(self._view(ns), name, _ttl(change.ttl), self._quota())
            except QuotaExceededError as exc:
                raise APIError(507, str(exc), code="quota_exceeded") from exc
        return self.get(ns, name)

    def delete(self, ns: str, name: str) -> dict[str, Any]:
        self.writable(ns, name)
        removal = store_status.remove(self._view(ns), name)
        return {
            "name": name,
            "object": "cache.deleted",
            "deleted": removal.pins > 0,
            "segments": removal.segments,
            "bytes_freed": removal.bytes_freed,
        }

    def create(self, ns: str, body: CacheCreate) -> tuple[ModelWorker, str, Callable[[], Any]]:
        """The worker to pin on, the cache's name, and the job that pins it (to run on the
        worker's thread, after the calls queued before it)."""
        worker = self._worker(body.model)
        cache = worker.cache
        ttl = _ttl(body.ttl)
        if (body.recipe is None) == (body.messages is None):
            raise APIError(400, "give a recipe, or messages (and tools), not both or neither")
        if body.recipe is not None:
            if body.tools is not None:
                raise APIError(400, "tools go inside the recipe", param="tools")
            recipe = _parse_recipe(body.recipe, body.name)
            name = recipe.name
            ttl = ttl if "ttl" in body.model_fields_set else recipe.ttl
            pinned = body.pinned and recipe.pinned

            def job() -> Any:
                return cache.pin(
                    recipe.messages,
                    name,
                    tools=recipe.tools or None,
                    ttl=ttl if pinned else 0.0,
                    namespace=ns,
                    source=SOURCE,
                    digest=recipe.content_digest(),
                    prefix_tokens=recipe_tokens(cache, recipe),
                )

        else:
            name = _name(body.name)
            pinned = body.pinned
            try:
                call = normalise_chat(body.messages, body.tools)
            except RequestError as exc:
                raise api_error(exc) from exc

            def job() -> Any:
                return cache.pin(
                    call.messages,
                    name,
                    tools=call.tools,
                    ttl=ttl if pinned else 0.0,
                    namespace=ns,
                    source=SOURCE,
                )

        if any(c["name"] == name and c["read_only"] for c in self.list(ns)):
            self.writable(ns, name)  # refuses
        return worker, name, job

    def _worker(self, model: str | None) -> ModelWorker:
        if model is not None:
            return self.server.worker(model)
        workers = list(self.server.workers.values())
        if len(workers) != 1:
            raise APIError(
                400,
                f"model is required: this server has {', '.join(w.id for w in workers)}",
                param="model",
            )
        return workers[0]


def _name(name: str | None) -> str:
    if name is None:
        raise APIError(400, f"name is required ({_NAME_HELP})", param="name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise APIError(400, f"name must be {_NAME_HELP}, got {name!r}", param="name")
    return name


def _parse_recipe(recipe: str | dict[str, Any], name: str | None) -> Recipe:
    """A recipe from a request: read as a recipe file would be, but confined to an empty folder
    (no includes or ``extends`` from the server's disk) and without ``model`` (a request
    names one of the served models instead)."""
    text = recipe if isinstance(recipe, str) else json.dumps(recipe)
    try:
        data = yaml.safe_load(text) if isinstance(recipe, str) else recipe
    except yaml.YAMLError:
        data = None  # load_recipe reports it with its line
    if isinstance(data, dict):
        for key in ("model", "extends"):
            if key in data:
                raise APIError(
                    400,
                    f"recipe: {key} is not allowed over HTTP (give the request's model instead; "
                    "a recipe sent here is self-contained)",
                    param=f"recipe.{key}",
                )
        own = data.get("name")
        if name is not None and own is not None and own != name:
            raise APIError(400, f"the recipe is named {own!r}, not {name!r}", param="name")
        name = name or own
        name = _name(name if isinstance(name, str) or name is None else str(name))
    else:
        name = "recipe"  # not a mapping: load_recipe says what is wrong, and on which line
    with tempfile.TemporaryDirectory(prefix="prefixcache-http-recipe-") as folder:
        path = Path(folder) / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_recipe(path, root=folder)
        except RecipeError as exc:
            where = f"line {exc.line}: " if exc.line else ""
            raise APIError(400, f"recipe: {where}{exc.reason}", param="recipe") from exc


def _describe(row: store_status.PinRow, read_only: bool, now: float) -> dict[str, Any]:
    # An unpinned cache never expires: its segments are ordinary LRU entries.
    ttl = row.ttl_left_s if row.pinned else None
    return {
        "object": "cache",
        "name": row.name,
        "model": row.model.removesuffix(".gguf"),
        "tokens": row.tokens,
        "bytes": row.bytes,
        "segments": row.segments,
        "pinned": row.pinned,
        "ttl_left_s": None if ttl is None else round(ttl, 1),
        "expires_at": None if ttl is None else int(now + ttl),
        "hits": row.hits,
        "last_used": row.last_used,
        "stored": row.stored,
        "read_only": read_only,
    }


def add_routes(app: FastAPI, server: Server) -> None:
    """``/v1/caches`` and ``/v1/caches/{name}`` on ``app``."""
    caches = Caches(server)

    @app.post("/v1/caches", status_code=201)
    async def create_cache(body: CacheCreate, request: Request) -> JSONResponse:
        ns = server.namespace(request)
        worker, name, job = await asyncio.to_thread(caches.create, ns, body)
        try:
            await asyncio.wrap_future(worker.submit(job))
        except QuotaExceededError as exc:
            raise APIError(507, str(exc), code="quota_exceeded") from exc
        except Exception as exc:
            raise api_error(exc) from exc
        return JSONResponse(await asyncio.to_thread(caches.get, ns, name), status_code=201)

    @app.get("/v1/caches")
    async def list_caches(request: Request) -> dict[str, Any]:
        ns = server.namespace(request)
        return {"object": "list", "data": await asyncio.to_thread(caches.list, ns)}

    @app.get("/v1/caches/{name}")
    async def get_cache(name: str, request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(caches.get, server.namespace(request), name)

    @app.patch("/v1/caches/{name}")
    async def patch_cache(name: str, body: CachePatch, request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(caches.patch, server.namespace(request), name, body)

    @app.delete("/v1/caches/{name}")
    async def delete_cache(name: str, request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(caches.delete, server.namespace(request), name)


__all__ = ["SOURCE", "CacheCreate", "CachePatch", "Caches", "add_routes"]
