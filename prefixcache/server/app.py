"""The HTTP routes over a started :class:`~prefixcache.server.core.Server`, and ``serve``.

Nothing here blocks the event loop: generation runs on each model's thread, and the Prometheus
scrape (which reads the store: a Redis round trip, a SQLite read) runs in a worker thread, one
at a time however many scrapers ask at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.exceptions import HTTPException

from .core import DEFAULT_WATCH_INTERVAL, Server, ServerConfig
from .schema import APIError, ChatRequest, CompletionRequest, api_error
from .worker import ModelWorker, stream_call

log = logging.getLogger(__name__)


# --- streaming ----------------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:  # after the headers: report in-band, as OpenAI does
            yield f"data: {json.dumps(api_error(exc).body())}\n\n"
        yield "data: [DONE]\n\n"

    return events()


# --- metrics ------------------------------------------------------------------------------------


class _Collector:
    """Prometheus metrics read from the caches' counters at scrape time (in a worker thread)."""

    def __init__(self, server: Server):
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        workers = list(s.workers.values())  # one snapshot for the whole scrape
        requests = CounterMetricFamily(
            "prefixcache_requests", "HTTP requests by endpoint and status", labels=["path", "code"]
        )
        for (path, code), n in sorted(s.request_counts().items()):
            requests.add_metric([path, str(code)], n)
        yield requests
        counters = {
            "calls": ("calls", "Generation calls"),
            "hits": ("hits", "Calls that restored a prefix from the store"),
            "misses": ("misses", "Calls that found no cached prefix"),
            "cached_tokens": ("cached_tokens", "Prompt tokens not prefilled (restored or live)"),
            "restored_tokens": ("restored_tokens", "Prompt tokens restored from the store"),
            "prefill_tokens": ("prefill_tokens", "Prompt tokens prefilled"),
            "restore_seconds": ("restore_seconds", "Seconds spent restoring KV state"),
            "bytes_restored": ("restored_bytes", "KV bytes read from the store"),
            "segments_saved": ("segments_saved", "Segments written to the store"),
            "corrupt_segments": ("corrupt_segments", "Segments quarantined as corrupt"),
            "refused_segments": (
                "refused_segments",
                "Intact segments not restorable here (refused by llama.cpp or not authenticated)",
            ),
            "store_errors": ("store_errors", "Store failures a call survived (reply still sent)"),
        }
        stats = {w.id: w.cache.stats() for w in workers}
        for key, (name, doc) in counters.items():
            family = CounterMetricFamily(f"prefixcache_{name}", doc, labels=["model"])
            for model, st in stats.items():
                if key in st:
                    family.add_metric([model], float(st[key]))
            yield family
        store = GaugeMetricFamily(
            "prefixcache_store_bytes", "KV bytes in the store", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "prefixcache_queue_depth", "Calls running or waiting", labels=["model"]
        )
        refused = CounterMetricFamily(
            "prefixcache_overload_refusals", "Requests refused with 429", labels=["model"]
        )
        for w in workers:
            store.add_metric([w.id], float(w.cache.store.total_bytes()))
            queue.add_metric([w.id], float(w.pending))
            refused.add_metric([w.id], float(w.busy_refusals))
        yield from (store, queue, refused)
        yield CounterMetricFamily("prefixcache_recipe_reloads", "Recipe reloads", value=s.reloads)


class _Scraper:
    """Runs the scrape in a worker thread, one at a time: callers that arrive while one runs
    share its result, so a slow store ties up one thread, not one per scraper."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._running: asyncio.Future[bytes] | None = None

    async def text(self) -> bytes:
        if self._running is None:
            running = asyncio.ensure_future(asyncio.to_thread(generate_latest, self.registry))
            self._running = running

            def done(_: object) -> None:
                self._running = None

            running.add_done_callback(done)
        # Shielded: a scraper that gives up does not cancel the others' scrape.
        return await asyncio.shield(self._running)


# --- routes -------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over a started :class:`Server`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(
                signal.SIGHUP,
                lambda: loop.run_in_executor(None, server.reload, "SIGHUP"),
            )
        server.watcher.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="prefixcache", lifespan=lifespan)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(server))
    scraper = _Scraper(registry)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        server.count(request.url.path, response.status_code)
        return response

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # Liveness for anyone (probes carry no key); the details only for a valid key.
        if server.authenticated(request) is None:
            return {"status": "ok"}
        return {
            "status": "ok",
            "models": {w.id: {"queued": w.pending} for w in server.workers.values()},
            "recipe_reloads": server.reloads,
            "uptime_s": round(time.time() - server.started, 1),
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        server.namespace(request)
        return PlainTextResponse(
            await scraper.text(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.namespace(request)
        created = int(server.started)
        return {
            "object": "list",
            "data": [
                {
                    "id": w.id,
                    "object": "model",
                    "created": created,
                    "owned_by": "prefixcache",
                    "recipes": [r.name for r in w.recipes],
                }
                for w in server.workers.values()
            ],
        }

    async def generate(
        worker: ModelWorker, stream: bool, call: Callable[..., Any], kwargs: dict[str, Any]
    ) -> Response:
        if not stream:
            kwargs.pop("stream_options", None)
            future = worker.submit(lambda: call(**kwargs))
            try:
                result = await asyncio.wrap_future(future)
            except Exception as exc:
                raise api_error(exc) from exc
            result["model"] = worker.id
            return JSONResponse(result)
        try:
            chunks = await stream_call(worker, lambda: call(stream=True, **kwargs))
        except Exception as exc:
            raise api_error(exc) from exc

        async def renamed() -> AsyncIterator[dict[str, Any]]:
            async for chunk in chunks:
                chunk["model"] = worker.id
                yield chunk

        return StreamingResponse(
            _sse(renamed()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        ns = server.namespace(request)
        worker = server.worker(body.model)
        messages = body.chat_messages()
        tools = body.tools

        def call(**kwargs: Any) -> Any:
            return worker.cache.chat(messages, tools=tools, namespace=ns, **kwargs)

        return await generate(worker, body.stream, call, body.llama_kwargs())

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ns = server.namespace(request)
        worker = server.worker(body.model)
        prompt = body.single_prompt()

        def call(**kwargs: Any) -> Any:
            return worker.cache.complete(prompt, namespace=ns, **kwargs)

        return await generate(worker, body.stream, call, body.llama_kwargs())

    return app


def serve(
    recipes: Sequence[str | os.PathLike[str]] = (),
    *,
    model: str | None = None,
    store: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] = (),
    n_ctx: int | None = None,
    max_queue: int = 8,
    quota_gb: float | None = None,
    verbose: bool = False,
    watch_interval: float | None = DEFAULT_WATCH_INTERVAL,
    recipes_root: str | os.PathLike[str] | None = None,
    confine_recipes: bool = True,
    store_key: str | None = None,
) -> None:
    """Load the models, prewarm the recipes, and serve until interrupted.

    ``api_keys`` are the keys themselves (see :func:`~prefixcache.server.auth.read_api_keys`
    for reading them from files and the environment). Recipes may read only files under
    ``recipes_root`` (default: each recipe path's folder) unless ``confine_recipes`` is false.
    ``store_key`` authenticates stored segments (None: ``$PREFIXCACHE_STORE_KEY``, if set).
    """
    config = ServerConfig(
        recipe_paths=[Path(p) for p in recipes],
        model=model,
        store=store,
        n_ctx=n_ctx,
        api_keys=list(api_keys),
        max_queue=max_queue,
        quota_gb=quota_gb,
        verbose=verbose,
        watch_interval=watch_interval,
        recipes_root=None if recipes_root is None else Path(recipes_root),
        confine_recipes=confine_recipes,
        store_key=store_key,
    )
    server = Server(config)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    log.info("serving %s on http://%s:%d/v1", ", ".join(server.workers), host, port)
    uvicorn.run(
        create_app(server),
        host=host,
        port=port,
        log_level="debug" if verbose else "warning",
        access_log=verbose,
    )


__all__ = ["create_app", "serve"]
