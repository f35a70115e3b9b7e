"""An OpenAI-compatible HTTP server with the prefix cache built in.

``prefixcache serve`` gives agent frameworks that speak the OpenAI API pinned-prefix speed without
code changes: ``/v1/chat/completions`` and ``/v1/completions`` (streaming or not),
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text). Each model is a
:class:`ModelWorker`: a :class:`~prefixcache.PrefixCache` and one thread that runs its calls one
at a time behind a bounded queue (HTTP 429 with Retry-After beyond it). Recipes are prewarmed
before the server listens, and again on SIGHUP or when a recipe or an included file changes.

With API keys, each key is a tenant: its requests use a namespace of their own, so tenants never
restore (or time) each other's cached prefixes; the recipes are pinned in every namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .cache import PrefixCache
from .config import resolve_model
from .errors import PrefixCacheError, PromptTooLongError, TemplateError
from .prewarm import context_size, group_by_model, prewarm
from .recipes import Recipe, load_recipes, watched_paths

log = logging.getLogger(__name__)

#: Seconds between checks of the recipe files for changes.
DEFAULT_WATCH_INTERVAL = 2.0


# --- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with an OpenAI-shaped body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Overloaded(APIError):
    def __init__(self, retry_after: int, waiting: int):
        super().__init__(
            429,
            f"the server is busy: {waiting} requests are queued for this model; retry in "
            f"{retry_after}s",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )


def api_error(exc: BaseException) -> APIError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, TemplateError | ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, PrefixCacheError):
        return APIError(500, str(exc), kind="server_error")
    log.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


# --- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI-style servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    #: Fields handed to llama-cpp-python when the client set them.
    PASSTHROUGH: ClassVar[tuple[str, ...]] = (
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    )

    def llama_kwargs(self) -> dict[str, Any]:
        """The arguments the client gave, so that unset ones keep llama-cpp-python's defaults."""
        out = {k: getattr(self, k) for k in self.PASSTHROUGH if k in self.model_fields_set}
        if out.get("logit_bias"):
            out["logit_bias"] = {int(k): v for k, v in out["logit_bias"].items()}
        if self.stream_options:
            out["stream_options"] = self.stream_options
        return out


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    PASSTHROUGH = (*_Request.PASSTHROUGH, "tool_choice", "response_format", "logprobs")

    def llama_kwargs(self) -> dict[str, Any]:
        out = super().llama_kwargs()
        if self.max_completion_tokens is not None and self.max_tokens is None:
            out["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages with text content parts joined: chat templates expect strings."""
        out = []
        for i, message in enumerate(self.messages):
            role = message.get("role")
            if not isinstance(role, str):
                raise APIError(400, f"messages[{i}] needs a role", param=f"messages[{i}].role")
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise APIError(
                            400,
                            f"messages[{i}]: only text content parts are supported",
                            param=f"messages[{i}].content",
                        )
                    texts.append(str(part.get("text", "")))
                message = {**message, "content": "".join(texts)}
            elif content is not None and not isinstance(content, str):
                raise APIError(
                    400,
                    f"messages[{i}].content must be a string or a list of text parts",
                    param=f"messages[{i}].content",
                )
            out.append(message)
        return out


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    PASSTHROUGH = (*_Request.PASSTHROUGH, "echo", "logprobs")

    def llama_kwargs(self) -> dict[str, Any]:
        out = super().llama_kwargs()
        out.setdefault("max_tokens", self.max_tokens)
        return out

    def single_prompt(self) -> str | list[int]:
        if self.suffix is not None:
            raise APIError(400, "suffix (infill) is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request, please", param="prompt")
            return str(prompt[0])
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompt  # type: ignore[return-value]


# --- models and their queues --------------------------------------------------------------------


def namespace_for(api_key: str | None) -> str:
    """The store namespace of one API key ("" without keys): a hash, never the key itself."""
    if not api_key:
        return ""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class ModelWorker:
    """One model behind a queue: calls run one at a time on a thread of their own.

    At most ``max_queue`` calls wait behind the running one; more are refused with
    :class:`Overloaded`, whose Retry-After estimate comes from the measured call times.
    """

    def __init__(self, model_id: str, cache: PrefixCache, max_queue: int):
        self.id = model_id
        self.cache = cache
        self.max_queue = max_queue
        self.recipes: list[Recipe] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"prefixcache-{model_id}")
        self._count = threading.Lock()
        self._pending = 0
        self._call_seconds = 1.0
        self.busy_refusals = 0

    @property
    def pending(self) -> int:
        return self._pending

    def submit(
        self, fn: Callable[[], Any], *, admit: bool = True
    ) -> concurrent.futures.Future[Any]:
        """Queue ``fn`` on the model's thread; ``admit`` applies the queue bound."""
        with self._count:
            if admit and self._pending > self.max_queue:
                self.busy_refusals += 1
                wait = max(1, math.ceil(self._pending * self._call_seconds))
                raise Overloaded(wait, self._pending - 1)
            self._pending += 1

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                spent = time.perf_counter() - t0
                with self._count:
                    self._pending -= 1
                    if admit:
                        self._call_seconds = 0.7 * self._call_seconds + 0.3 * spent

        return self._executor.submit(timed)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.cache.close()


# --- the application ----------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """What ``prefixcache serve`` was asked for."""

    recipe_paths: list[Path] = field(default_factory=list)
    model: str | None = None
    store: str | None = None
    n_ctx: int | None = None
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 8
    quota_gb: float | None = None
    verbose: bool = False
    watch_interval: float | None = DEFAULT_WATCH_INTERVAL


class Server:
    """The models, their recipes and the reload machinery behind the HTTP app."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.workers: dict[str, ModelWorker] = {}
        self.started = time.time()
        self.reloads = 0
        self.requests: dict[tuple[str, int], int] = {}
        self._reload_lock = threading.Lock()
        self._watched: set[Path] = set()  # files and folders of the last good load
        self._seen: dict[Path, tuple[int, int]] = {}  # their state when last looked at
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def namespaces(self) -> list[str]:
        return [namespace_for(k) for k in self.config.api_keys] or [""]

    # models and recipes --------------------------------------------------------------------

    def start(self) -> None:
        """Load the models and prewarm every recipe (before the server listens)."""
        self._apply(self._load_recipes())

    def _apply(self, recipes: list[Recipe]) -> None:
        """Prewarm ``recipes`` on their models (loading those not loaded yet) and watch them.

        With no recipes and no model loaded yet, the default model is loaded.
        """
        groups = group_by_model(recipes, self.config.model) if recipes else {}
        if not groups and not self.workers:
            groups = {resolve_model(self.config.model): []}
        for model, group in groups.items():
            self._prewarm(self._worker_for(model, group), group)
        self._watched = watched_paths(recipes)
        self._seen = self.snapshot()

    def _load_recipes(self) -> list[Recipe]:
        paths = self.config.recipe_paths
        return load_recipes(paths) if paths else []

    def _worker_for(self, model: Path, recipes: list[Recipe]) -> ModelWorker:
        model_id = model.name.removesuffix(".gguf")
        worker = self.workers.get(model_id)
        if worker is None:
            n_ctx = context_size(recipes, self.config.n_ctx)
            log.info("loading %s (n_ctx %d)", model.name, n_ctx)
            cache = PrefixCache.open(
                model,
                self.config.store,
                n_ctx=n_ctx,
                verbose=self.config.verbose,
                quota_gb=self.config.quota_gb,
            )
            worker = self.workers[model_id] = ModelWorker(model_id, cache, self.config.max_queue)
        worker.recipes = recipes
        return worker

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

    # watching ------------------------------------------------------------------------------

    def snapshot(self) -> dict[Path, tuple[int, int]]:
        """Modification time and size of every file the recipes came from, and of the folders
        holding them and the recipe folders' entries (so added and removed files count too)."""
        paths = set(self._watched)
        for arg in self.config.recipe_paths:
            paths.add(arg.absolute())
            if arg.is_dir():
                paths.update(p.absolute() for p in arg.iterdir())
        return {path: _stat(path) for path in paths}

    def watch(self) -> None:
        """Poll for changes in the background (every ``watch_interval`` seconds)."""
        interval = self.config.watch_interval
        if not interval or not self.config.recipe_paths:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    now = self.snapshot()
                    if now != self._seen:
                        # Remembered before reloading: a broken recipe is retried on its next
                        # change (or SIGHUP), not every interval.
                        self._seen = now
                        self.reload("a recipe file changed")
                except Exception:  # the watcher must outlive any one bad reload
                    log.exception("recipe watcher")

        self._watcher = threading.Thread(target=loop, name="prefixcache-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        for worker in self.workers.values():
            worker.close()

    # requests ------------------------------------------------------------------------------

    def worker(self, model: str) -> ModelWorker:
        worker = self.workers.get(model)
        if worker is None:
            known = ", ".join(sorted(self.workers))
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server has: {known}",
                code="model_not_found",
                param="model",
            )
        return worker

    def namespace(self, request: Request) -> str:
        if not self.config.api_keys:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.config.api_keys:
            raise APIError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                kind="authentication_error",
                code="invalid_api_key",
            )
        return namespace_for(key.strip())

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


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


# --- streaming ----------------------------------------------------------------------------------

_END = object()


async def _stream_call(
    worker: ModelWorker, start: Callable[[], Iterator[dict[str, Any]]]
) -> AsyncIterator[dict[str, Any]]:
    """Run a streaming call on the model's thread and hand its chunks over as they come.

    The first chunk (or the error that stopped the call before it) is awaited before this returns,
    so errors such as an over-long prompt become a proper HTTP status. When the consumer stops
    early (the client went away) the call is closed after its next chunk, freeing the model.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            cancel.set()

    def job() -> None:
        chunks = start()
        try:
            for chunk in chunks:
                put(chunk)
                if cancel.is_set():
                    log.info("client went away: stream stopped, model freed")
                    break
        except BaseException as exc:
            put(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            put(_END)

    worker.submit(job)
    first = await queue.get()
    if isinstance(first, BaseException):
        raise first

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        item = first
        try:
            while item is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
                item = await queue.get()
        finally:
            cancel.set()

    return chunks()


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
    """Prometheus metrics read from the caches' counters at scrape time."""

    def __init__(self, server: Server):
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        requests = CounterMetricFamily(
            "prefixcache_requests", "HTTP requests by endpoint and status", labels=["path", "code"]
        )
        for (path, code), n in sorted(s.requests.items()):
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
        }
        stats = {w.id: w.cache.stats() for w in s.workers.values()}
        for key, (name, doc) in counters.items():
            family = CounterMetricFamily(f"prefixcache_{name}", doc, labels=["model"])
            for model, st in stats.items():
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
        for w in s.workers.values():
            store.add_metric([w.id], float(w.cache.store.total_bytes()))
            queue.add_metric([w.id], float(w.pending))
            refused.add_metric([w.id], float(w.busy_refusals))
        yield from (store, queue, refused)
        yield CounterMetricFamily("prefixcache_recipe_reloads", "Recipe reloads", value=s.reloads)


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
        server.watch()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="prefixcache", lifespan=lifespan)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(server))

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
    async def health() -> dict[str, Any]:
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
            generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8"
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
            chunks = await _stream_call(worker, lambda: call(stream=True, **kwargs))
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
) -> None:
    """Load the models, prewarm the recipes, and serve until interrupted."""
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


__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "ModelWorker",
    "Server",
    "ServerConfig",
    "create_app",
    "namespace_for",
    "serve",
]
