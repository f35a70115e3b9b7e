"""One model behind a bounded queue, and streaming calls handed from its thread to the event loop.

A :class:`ModelWorker` runs its model's calls one at a time on a thread of its own, so the event
loop never waits for llama.cpp, and refuses calls beyond its queue bound with HTTP 429.
:func:`stream_call` runs a streaming call wholly on that thread (the iterator is advanced and
closed there) and passes its chunks to the event loop through a queue. Every call streams, even
one whose client asked for a single response (:func:`collect_call` assembles it), so that a
client that goes away, or gives up waiting, frees the model at the next token: a server shared
by agents cannot be wedged by one that abandoned a long request. A model prefills the replies it
gave ahead of their next turn (:mod:`prefixcache.ahead`) only while its queue is empty.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ..cache import PrefixCache
from ..errors import PromptTooLongError
from ..recipes import Recipe
from .assemble import Assembler
from .schema import APIError, Overloaded

log = logging.getLogger(__name__)


class ModelWorker:
    """One model behind a queue: calls run one at a time on a thread of their own.

    At most ``max_queue`` calls wait behind the running one; more are refused with
    :class:`Overloaded`, whose Retry-After estimate comes from the measured call times. A closed
    worker (its model unloaded by a reload) refuses new calls with 404. Replies are prefilled
    ahead only while no call runs or waits: a call queued here makes that work give the model
    back after its current micro-batch.
    """

    def __init__(self, model_id: str, cache: PrefixCache, max_queue: int):
        self.id = model_id
        self.cache = cache
        self.max_queue = max_queue
        #: The recipes prewarmed on this model; replaced on reload, never changed in place.
        self.recipes: list[Recipe] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"prefixcache-{model_id}")
        self._count = threading.Lock()
        self._pending = 0
        self._call_seconds = 1.0
        self._closed = False
        self.busy_refusals = 0
        cache.ahead.ready = self._queue_empty

    def _queue_empty(self) -> bool:
        return self._pending == 0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, fn: Callable[[], Any], *, admit: bool = True
    ) -> concurrent.futures.Future[Any]:
        """Queue ``fn`` on the model's thread; ``admit`` applies the queue bound."""
        with self._count:
            if self._closed:
                raise APIError(
                    404,
                    f"the model {self.id!r} was unloaded: no recipe uses it any more",
                    code="model_not_found",
                    param="model",
                )
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
                    empty = self._pending == 0
                if empty:
                    self.cache.ahead.wake()

        return self._executor.submit(timed)

    def close(self, *, cancel: bool = True) -> None:
        """Refuse new calls, then close the model once the thread is done.

        ``cancel`` drops the calls still queued (at shutdown); without it they run first (when a
        reload unloads a model that requests were already waiting for).
        """
        with self._count:
            self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        self.cache.close()


# --- calls that stop when their client goes away ----------------------------------------------

#: Seconds between checks whether a client that is waiting for its reply is still connected.
DISCONNECT_POLL = 0.2

#: ``request.is_disconnected``: whether the client has closed its connection.
Disconnected = Callable[[], Awaitable[bool]]

_END = object()
_T = TypeVar("_T")


class ClientGone(Exception):
    """The client closed its connection (it went away, or gave up waiting) before its reply."""


async def _unless_gone(
    work: Awaitable[_T], disconnected: Disconnected | None, poll: float = DISCONNECT_POLL
) -> _T:
    """Await ``work``, checking every ``poll`` seconds that the client is still there.

    Raises :class:`ClientGone` when it is not; ``work`` is then cancelled, as it is when the
    caller itself is cancelled.
    """
    task = asyncio.ensure_future(work)
    try:
        if disconnected is None:
            return await task
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            # Its own CancelledError is returned, not raised; the caller's own still propagates.
            await asyncio.gather(task, return_exceptions=True)


async def stream_call(
    worker: ModelWorker,
    start: Callable[[], Iterator[dict[str, Any]]],
    *,
    disconnected: Disconnected | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Run a streaming call on the model's thread and hand its chunks over as they come.

    The first chunk (or the error that stopped the call before it) is awaited before this returns,
    so errors such as an over-long prompt become a proper HTTP status. When the consumer stops
    early (the client went away) the call is closed after its next chunk, freeing the model; a
    call whose client went away while it waited in the queue (``disconnected``) never starts.
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
        chunks: Iterator[dict[str, Any]] | None = None
        try:
            if cancel.is_set():
                log.info("client went away while queued: call dropped")
                return
            chunks = start()  # inside the try: a call may refuse its arguments before a chunk
            for chunk in chunks:
                put(chunk)
                if cancel.is_set():
                    log.info("client went away: generation stopped, model freed")
                    break
        except BaseException as exc:
            put(exc)
        finally:
            try:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            finally:
                put(_END)  # whatever happened, the consumer is never left waiting

    worker.submit(job)
    try:
        first = await _unless_gone(queue.get(), disconnected)
    except BaseException:
        cancel.set()
        raise
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


async def collect_call(
    worker: ModelWorker,
    start: Callable[[], Iterator[dict[str, Any]]],
    *,
    disconnected: Disconnected | None = None,
) -> dict[str, Any]:
    """Run a streaming call to its end and return the response ``stream=False`` would give.

    The call streams on the model's thread like any other (``start`` must ask for the usage
    chunk), so that when the client goes away (``disconnected``) it stops at its next token
    with :class:`ClientGone` instead of holding the model until ``max_tokens``.
    """
    assembler = Assembler()
    chunks = await stream_call(worker, start, disconnected=disconnected)

    async def drain() -> None:
        async for chunk in chunks:
            assembler.add(chunk)

    await _unless_gone(drain(), disconnected)
    return assembler.result()


# --- the server-wide cap on max_tokens ----------------------------------------------------------


def capped(call: Callable[..., Any], kwargs: dict[str, Any], cap: int | None) -> Callable[[], Any]:
    """A ``start`` for :func:`stream_call`: ``call(**kwargs)`` with ``max_tokens`` at most ``cap``.

    A request over the cap is clipped (it ends with ``finish_reason: "length"``); one without
    ``max_tokens`` gets the cap, or, when its prompt leaves less context than that, the rest of
    the context (as llama.cpp gives without a cap), rather than a context_length_exceeded error
    for a limit the client never asked for. ``cap`` None or 0: no cap. ``call`` may stream
    (an iterator of chunks) or not (one response).
    """
    asked = kwargs.get("max_tokens")
    if cap and asked is not None and asked > cap:
        log.debug("max_tokens %d clipped to the server's cap %d", asked, cap)
        kwargs = {**kwargs, "max_tokens": cap}
    if not cap or asked is not None:
        return lambda: call(**kwargs)

    def start() -> Any:
        out = None
        try:
            out = call(**{**kwargs, "max_tokens": cap})
            if not isinstance(out, Iterator):
                return out
            first = next(out)
        except PromptTooLongError:
            _close(out)
            # Prompt plus cap is over the context: let the call stop at the context's end.
            return call(**{**kwargs, "max_tokens": None})
        except StopIteration:
            _close(out)
            return iter(())
        except BaseException:
            _close(out)
            raise
        return _prepend(first, out)

    return start


def _prepend(first: dict[str, Any], chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    try:
        yield first
        yield from chunks
    finally:
        _close(chunks)


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


__all__ = [
    "DISCONNECT_POLL",
    "ClientGone",
    "ModelWorker",
    "capped",
    "collect_call",
    "stream_call",
]
