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
import urllib.parse
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..explain import DIVERGED_IN_PIN
from . import caches, messages, responses
from .core import DEFAULT_MAX_TOKENS_CAP, DEFAULT_WATCH_INTERVAL, Server, ServerConfig
from .schema import APIError, ChatRequest, CompletionRequest, api_error
from .worker import ClientGone, ModelWorker, capped, collect_call, stream_call

log = logging.getLogger(__name__)

#: Set on a generation response whose prompt left a pinned prefix before its end
#: (``pin=NAME; at=TOKEN; of=PIN_TOKENS``): see docs/server.md, "Why did my request miss?".
DIVERGED_HEADER = "x-prefixcache-diverged"


def _diverged(calls: Sequence[Any]) -> dict[str, str]:
    """The :data:`DIVERGED_HEADER` of the call that ran (the last ``start`` made), if any.

    Read once the call's first chunk is out: its restore is done by then.
    """
    prepared = getattr(calls[-1], "prepared", None) if calls else None
    diverged = getattr(prepared, "diverged", None)
    if diverged is None or diverged.kind != DIVERGED_IN_PIN:
        return {}
    # A pin is named by its recipe; quoted, so that any name makes a valid header.
    return {DIVERGED_HEADER: urllib.parse.quote(diverged.header(), safe=" =;-_.~:/@+")}


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
            "reply_prefill_tokens": (
                "reply_prefill_tokens",
                "Reply tokens prefilled in the background, ahead of their next turn",
            ),
            "reply_prefill_reused_tokens": (
                "reply_prefill_reused_tokens",
                "Tokens prefilled ahead that a next turn reused instead of prefilling them",
            ),
        }
        stats = {w.id: w.cache.stats() for w in workers}
        for key, (name, doc) in counters.items():
            family = CounterMetricFamily(f"prefixcache_{name}", doc, labels=["model"])
            for model, st in stats.items():
                if key in st:
                    family.add_metric([model], float(st[key]))
            yield family
        partial = CounterMetricFamily(
            "prefixcache_partial_restores",
            "Calls whose prompt left a stored prefix, by reason (diverged_in_pin: before a pin's "
            "end; diverged: an unpinned one; no_match; restore_failed)",
            labels=["model", "reason"],
        )
        for model, st in stats.items():
            for reason, n in sorted(st.get("partial_restores", {}).items()):
                partial.add_metric([model, reason], float(n))
        yield partial
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
        yield from s.api_cache.collect()


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


class _CountRequests:
    """Counts responses by path and status for ``/metrics``.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides the
    client's disconnect from the endpoint, and a request whose client went away must stop.
    """

    def __init__(self, app: ASGIApp, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.server.count(scope["path"], status)


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

    app.add_middleware(_CountRequests, server=server)

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
        workers = server.workers
        # The models, then each recipe name and alias (``root``: the model it stands for).
        data = [
            {
                "id": w.id,
                "object": "model",
                "created": created,
                "owned_by": "prefixcache",
                "recipes": [r.name for r in w.recipes],
            }
            for w in workers.values()
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "prefixcache",
                "root": model,
                "recipe": recipe.name,
            }
            for name, (model, recipe) in server.names.items()
            if model in workers
        ]
        return {"object": "list", "data": data}

    async def generate(
        worker: ModelWorker,
        stream: bool,
        call: Callable[..., Any],
        kwargs: dict[str, Any],
        request: Request | None = None,
        model: str | None = None,
    ) -> Response:
        """Run ``call`` on the worker under the server's max_tokens cap, answering as ``model``
        (the name the client gave; default the worker's id).

        Every call streams internally, a non-streaming one assembled at its end, so that a
        client that goes away (``request``) stops it at its next token (HTTP 499 in the logs).
        Only ``echo`` (completions without streaming) needs the blocking call.
        """
        name = model or worker.id
        cap = server.config.max_tokens_cap
        gone = request.is_disconnected if request is not None else None
        made: list[Any] = []  # what each start made (a retry without max_tokens makes two)

        def traced(**kw: Any) -> Any:
            made.append(call(stream=True, **kw))
            return made[-1]

        try:
            if not stream and kwargs.get("echo"):
                kwargs.pop("stream_options", None)
                result = await asyncio.wrap_future(worker.submit(capped(call, kwargs, cap)))
            elif not stream:
                kwargs["stream_options"] = {"include_usage": True}
                result = await collect_call(worker, capped(traced, kwargs, cap), disconnected=gone)
            else:
                chunks = await stream_call(worker, capped(traced, kwargs, cap), disconnected=gone)
        except ClientGone:
            log.info("client went away before its reply: generation stopped")
            return Response(status_code=499)
        except Exception as exc:
            raise api_error(exc) from exc
        headers = _diverged(made)
        server.api_cache.record_call(request.url.path if request else "", worker.id, made)
        if not stream:
            result["model"] = name
            return JSONResponse(result, headers=headers)

        async def renamed() -> AsyncIterator[dict[str, Any]]:
            async for chunk in chunks:
                chunk["model"] = name
                yield chunk

        return StreamingResponse(
            _sse(renamed()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        ns = server.namespace(request)
        worker = server.worker(body.model)
        checked = body.checked()  # a malformed request is a 400 before it queues

        def call(**kwargs: Any) -> Any:
            return worker.cache.chat(checked.messages, tools=checked.tools, namespace=ns, **kwargs)

        return await generate(
            worker, body.stream, call, body.llama_kwargs(), request=request, model=body.model
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ns = server.namespace(request)
        worker = server.worker(body.model)
        prompt = body.single_prompt()

        def call(**kwargs: Any) -> Any:
            return worker.cache.complete(prompt, namespace=ns, **kwargs)

        return await generate(
            worker, body.stream, call, body.llama_kwargs(), request=request, model=body.model
        )

    responses.add_routes(app, server)
    caches.add_routes(app, server)
    messages.add_routes(app, server)
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
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP,
    chat_template: str | None = None,
    chat_format: str | None = None,
    prefill_replies: bool = True,
) -> None:
    """Load the models, prewarm the recipes, and serve until interrupted.

    ``api_keys`` are the keys themselves (see :func:`~prefixcache.server.auth.read_api_keys`
    for reading them from files and the environment). Recipes may read only files under
    ``recipes_root`` (default: each recipe path's folder) unless ``confine_recipes`` is false.
    ``store_key`` authenticates stored segments (None: ``$PREFIXCACHE_STORE_KEY``, if set).
    ``max_tokens_cap`` bounds every request's ``max_tokens`` (and is the default for requests
    without one); None or 0: no cap. ``chat_template`` (Jinja text or a file) or ``chat_format``
    (a llama-cpp-python format) renders conversations for models whose recipes name none.
    ``prefill_replies``: prefill each chat reply for the next turn while the model is idle.
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
        max_tokens_cap=max_tokens_cap,
        chat_template=chat_template,
        chat_format=chat_format,
        prefill_replies=prefill_replies,
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


__all__ = ["DIVERGED_HEADER", "create_app", "serve"]
