"""One model behind a bounded queue, and streaming calls handed from its thread to the event loop.

A :class:`ModelWorker` runs its model's calls one at a time on a thread of its own, so the event
loop never waits for llama.cpp, and refuses calls beyond its queue bound with HTTP 429.
:func:`stream_call` runs a streaming call wholly on that thread (the iterator is advanced and
closed there) and passes its chunks to the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..cache import PrefixCache
from ..recipes import Recipe
from .schema import APIError, Overloaded

log = logging.getLogger(__name__)


class ModelWorker:
    """One model behind a queue: calls run one at a time on a thread of their own.

    At most ``max_queue`` calls wait behind the running one; more are refused with
    :class:`Overloaded`, whose Retry-After estimate comes from the measured call times. A closed
    worker (its model unloaded by a reload) refuses new calls with 404.
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


# --- streaming ----------------------------------------------------------------------------------

_END = object()


async def stream_call(
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
        chunks: Iterator[dict[str, Any]] | None = None
        try:
            chunks = start()  # inside the try: a call may refuse its arguments before a chunk
            for chunk in chunks:
                put(chunk)
                if cancel.is_set():
                    log.info("client went away: stream stopped, model freed")
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


__all__ = ["ModelWorker", "stream_call"]
