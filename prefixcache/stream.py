"""Streaming calls whose iterator may be advanced, closed or dropped on any thread.

A streaming call runs on a producer thread of its own: it takes the model's lock, runs the call to
its end (or until the consumer closes the stream) and releases the lock itself, handing chunks
over through a queue. The lock's owner is therefore never in doubt, whatever thread advances or
closes the iterator (Starlette's ``iterate_in_threadpool``, ``run_in_executor``), and a stream
dropped without ``close()`` stops at its next token once it is garbage-collected, or runs to
``max_tokens`` without waiting for a reader: it never holds the model waiting on its consumer.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp

Chunk = dict[str, Any]

#: Guards the creation of per-model locks (two caches adopting one Llama get the same lock).
_LOCKS_GUARD = threading.Lock()


def model_lock(llm: llama_cpp.Llama) -> threading.RLock:
    """The lock that serialises every prefixcache call on ``llm``, created once per Llama."""
    with _LOCKS_GUARD:
        lock = getattr(llm, "_prefixcache_lock", None)
        if lock is None:
            lock = threading.RLock()
            llm._prefixcache_lock = lock  # type: ignore[attr-defined]
        return lock


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _produce(
    body: Callable[[threading.Event], Iterator[Chunk]],
    lock: threading.RLock,
    out: queue.SimpleQueue[Any],
    cancel: threading.Event,
) -> None:
    # Takes no reference to the Stream, so that a dropped Stream can be collected.
    try:
        with lock:
            for chunk in body(cancel):
                out.put(chunk)
    except BaseException as exc:
        out.put(_Failed(exc))
    finally:
        out.put(_End())


class Stream(Iterator[Chunk]):
    """The chunks of one streaming call (see the module docstring).

    ``body(cancel)`` runs under ``lock`` on the producer thread; it should stop generating soon
    after ``cancel`` is set and may still finish its bookkeeping.
    """

    def __init__(
        self,
        body: Callable[[threading.Event], Iterator[Chunk]],
        lock: threading.RLock,
        name: str = "prefixcache-stream",
    ):
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce, args=(body, lock, self._queue, self._cancel), name=name, daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._cancel.set)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.exc
        return item

    def close(self, timeout: float | None = None) -> None:
        """Stop the call after its current token and wait until the model is free again."""
        self._cancel.set()
        self._done = True
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Stream", "model_lock"]
