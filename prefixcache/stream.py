"""Streaming calls whose iterator may be advanced, closed or dropped on any thread.

A streaming call runs on a producer thread of its own: it takes the model's lock, runs the call to
its end (or until the consumer closes the stream) and releases the lock itself, handing chunks
over through a queue. The lock's owner is therefore never in doubt, whatever thread advances or
closes the iterator (Starlette's ``iterate_in_threadpool``, ``run_in_executor``), and a stream
dropped without ``close()`` stops at its next token once it is garbage-collected, or runs to
``max_tokens`` without waiting for a reader: it never holds the model waiting on its consumer.

Every call takes the model's :class:`ModelLock`, which also knows whether a call is waiting for it,
so that background work (replies prefilled ahead, :mod:`prefixcache.ahead`) yields it between
micro-batches as soon as real work wants the model.
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


class ModelLock:
    """A re-entrant lock that serialises the calls on one model and knows who wants it.

    Used as ``with lock:`` by every call. Background work takes it with :meth:`acquire_idle`
    instead, only when no call holds it or waits for it, and gives it back as soon as
    :attr:`wanted` says a call is waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0  # calls blocked in acquire() (guarded by _cond)
        self._depth = 0  # re-entrant depth of the owner (changed only by the owner)
        #: The model is freed (or being freed): background work never takes it again.
        self.retired = False
        self._watched = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._cond:
            self._waiting += 1
        try:
            ok = self._lock.acquire(blocking, timeout)
        finally:
            with self._cond:
                self._waiting -= 1
        if ok:
            self._depth += 1
        return ok

    def release(self) -> None:
        self._depth -= 1
        free = self._depth == 0
        try:
            self._lock.release()
        except RuntimeError:  # not the owner: nothing was released
            self._depth += 1
            raise
        if free:
            self.notify()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def wanted(self) -> bool:
        """Whether a call is waiting for the lock (background work should give it back)."""
        return self._waiting > 0

    def notify(self) -> None:
        """Wake :meth:`acquire_idle` to look again (the lock is free, or its condition changed)."""
        with self._cond:
            self._cond.notify_all()

    def watch(self, llm: llama_cpp.Llama) -> None:
        """Retire this lock when ``llm`` is closed, before its context is freed (once per lock;
        call it after the context is final: llama-cpp-python frees in reverse order)."""
        with _LOCKS_GUARD:
            if self._watched:
                return
            self._watched = True
        llm._stack.callback(self.retire)

    def retire(self) -> None:
        """Wait for the background work holding the model, then keep it away for good."""
        with self:
            self.retired = True
        self.notify()

    def acquire_idle(
        self, ready: Callable[[], bool], stop: Callable[[], bool], poll: float = 0.1
    ) -> bool:
        """Take the lock for background work once no call holds it or waits for it and
        ``ready()`` is true; False (the lock not taken) as soon as ``stop()`` is true.

        ``ready`` and ``stop`` are checked again on every :meth:`notify` and every ``poll``
        seconds; they must be quick and must not take this lock.
        """
        with self._cond:
            while not stop() and not self.retired:
                if self._waiting == 0 and ready() and self._lock.acquire(blocking=False):
                    self._depth += 1
                    if not self.retired:
                        return True
                    self._depth -= 1
                    self._lock.release()
                    break
                self._cond.wait(poll)
        return False


def model_lock(llm: llama_cpp.Llama) -> ModelLock:
    """The lock that serialises every prefixcache call on ``llm``, created once per Llama."""
    with _LOCKS_GUARD:
        lock = getattr(llm, "_prefixcache_lock", None)
        if lock is None:
            lock = ModelLock()
            llm._prefixcache_lock = lock  # type: ignore[attr-defined]
        return lock


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _produce(
    body: Callable[[threading.Event], Iterator[Chunk]],
    lock: ModelLock,
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
        lock: ModelLock,
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


__all__ = ["ModelLock", "Stream", "model_lock"]
