"""Replies prefilled ahead: the next turn's prefix made ready while the agent runs its tools.

In an agent loop the model is idle while the agent runs the tool it was asked to call, and the next
turn's prompt will begin with this turn's conversation and the assistant's reply, rendered by the
chat template. The reply's KV in the context came from decoding, one token at a time; it differs in
its last bits from a batched prefill, so it is never reused (see ``LlamaKV.live_tokens``), and the
next turn would prefill the reply again, on its critical path. :class:`ReplyPrefill` does that
prefill in the background instead: it renders the conversation with the reply up to where the
next message starts (the boundary pins use: ``ChatTemplate.prefix_tokens`` probes continuations,
so it is a prefix of the next prompt whatever message comes next), evaluates it in batches of one
micro-batch, none of one token (so the KV is what a cold run computes), and stores it as autosave
does.

It never delays a call: it takes the model only when no call holds it or waits for it (and, in
the server, when the model's queue is empty: :attr:`ReplyPrefill.ready`), and gives it back
between micro-batches as soon as one does, keeping what it has done (live, and stored). The rest
is resumed when the model is idle again, unless a call has meanwhile taken this conversation
further: that call prefilled the rest itself.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PrefixCacheError
from .radix import common_prefix_length
from .template import Message

if TYPE_CHECKING:
    from .cache import PrefixCache, Prepared

log = logging.getLogger(__name__)

#: Replies waiting to be prefilled, per cache, at most (beyond it the oldest is dropped).
MAX_PENDING = 4
#: Replies prefilled (wholly or in part) whose next turn has not come yet, remembered per cache
#: to count what that turn reuses.
MAX_REMEMBERED = 16


@dataclass
class AheadStats:
    """What prefilling replies ahead did (in ``PrefixCache.stats()`` as ``reply_prefill_*``)."""

    tokens: int = 0  # tokens prefilled ahead of time, off the critical path
    seconds: float = 0.0  # the time that took
    runs: int = 0  # replies wholly prefilled
    preempted: int = 0  # times a call made it give the model back before it was done
    reused_tokens: int = 0  # of the tokens prefilled ahead, those a later call reused
    saved_s: float = 0.0  # the prefill time those would have cost that call


@dataclass(eq=False)
class _Job:
    """One reply to prefill: the conversation, the reply and where the call that made it was."""

    messages: list[Message]
    reply: Message
    tools: list[dict[str, Any]] | None
    namespace: str
    save: bool
    #: The prompt of the call that made the reply: a later call that contains all of it has
    #: taken this conversation further, so the job is done with.
    prompt: Sequence[int]
    tokens: list[int] | None = None  # the next turn's prefix (rendered on the background thread)
    start: int | None = None  # where prefilling ahead began (the tokens before it were exact)
    end: int = 0  # how far the prefix is prefilled
    evaluated: int = 0
    seconds: float = 0.0
    counted: bool = False

    def covered_by(self, tokens: Sequence[int]) -> bool:
        return common_prefix_length(self.prompt, tokens) >= len(self.prompt)


def _always() -> bool:
    return True


class ReplyPrefill:
    """The background prefill of replies for one :class:`~prefixcache.PrefixCache`.

    A thread is started when there is work and ends when there is none left. ``ready`` (default:
    always) is a further condition for taking the model, checked again between micro-batches and
    whenever :meth:`wake` is called: the server makes it "the model's queue is empty".
    """

    def __init__(self, cache: PrefixCache):
        self._cache = cache
        self._lock = cache._lock
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._jobs: deque[_Job] = deque()
        self._remembered: deque[_Job] = deque(maxlen=MAX_REMEMBERED)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = AheadStats()
        self.ready: Callable[[], bool] = _always
        # A Llama closed without closing its caches (another cache on it, or by hand) must not
        # be prefilled on after: closing it waits for the micro-batch and stops this work.
        self._lock.watch(cache.llm)

    # what calls do ----------------------------------------------------------------------------

    def schedule(
        self,
        messages: Sequence[Message],
        reply: Message,
        tools: Sequence[Mapping[str, Any]] | None,
        namespace: str,
        prompt: Sequence[int],
        *,
        save: bool = True,
        tokens: list[int] | None = None,
    ) -> None:
        """Prefill ``messages`` + ``reply`` (up to where the next message starts) when idle.

        ``prompt``: the tokens of the call that made the reply. ``tokens``: the prefix, if the
        caller rendered it already. Returns at once; the work is done on a background thread.
        """
        job = _Job(
            messages=[dict(m) for m in messages],
            reply=dict(reply),
            tools=[dict(t) for t in tools] if tools else None,
            namespace=namespace,
            save=save,
            prompt=list(prompt),
            tokens=tokens,
        )
        with self._mutex:
            if self._closed:
                return
            self._jobs.append(job)
            while len(self._jobs) > MAX_PENDING:
                self._jobs.popleft()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="prefixcache-ahead", daemon=True
                )
                _RUNNING.add(self)
                self._thread.start()
        self.wake()

    def started(self, namespace: str, prepared: Prepared) -> None:
        """A call on the model is about to run ``prepared`` (it holds the model lock): count
        what it reuses of the replies prefilled ahead, and drop the jobs it takes further."""
        tokens = prepared.tokens
        with self._mutex:
            for job in list(self._jobs):
                if job.namespace == namespace and job.covered_by(tokens):
                    self._jobs.remove(job)
            for job in list(self._remembered):
                if job.namespace != namespace or job.tokens is None or job.start is None:
                    continue
                shared = common_prefix_length(job.tokens[: job.end], tokens)
                gained = min(job.evaluated, min(prepared.reused_tokens, shared) - job.start)
                if gained > 0:
                    self._stats.reused_tokens += gained
                    self._stats.saved_s += gained * job.seconds / job.evaluated
                    self._remembered.remove(job)
            self._changed.notify_all()

    def drop(self) -> None:
        """Forget the replies waiting to be prefilled (the caller holds the model lock, so none
        is being prefilled): the model is about to be used directly, without the lock."""
        with self._mutex:
            self._jobs.clear()
            self._changed.notify_all()

    def wake(self) -> None:
        """Look again whether the model is free (``ready`` may have changed)."""
        self._lock.notify()

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until no reply is waiting to be prefilled or being prefilled; False on timeout.

        Never call it while holding the model (from inside a call): the work it waits for needs
        the model. In the server the work also waits for the model's queue to be empty.
        """
        with self._changed:
            return self._changed.wait_for(lambda: not self._jobs and self._thread is None, timeout)

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            s = self._stats
            return {
                "reply_prefill_tokens": s.tokens,
                "reply_prefill_seconds": s.seconds,
                "reply_prefill_runs": s.runs,
                "reply_prefill_preempted": s.preempted,
                "reply_prefill_reused_tokens": s.reused_tokens,
                "reply_prefill_saved_s": s.saved_s,
            }

    def close(self, timeout: float | None = 30.0) -> None:
        """Drop the waiting work and stop the background thread (after its micro-batch)."""
        with self._mutex:
            self._closed = True
            self._jobs.clear()
            thread = self._thread
            self._changed.notify_all()
        self.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # the background thread --------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._closed

    def _should_yield(self) -> bool:
        return self._closed or self._lock.wanted or self._lock.retired or not self.ready()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not take the process down with it
            log.exception("prefilling replies ahead stopped")
            with self._mutex:
                self._jobs.clear()
                self._thread = None
                self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self._mutex:
                if self._closed or not self._jobs:
                    self._jobs.clear()
                    self._thread = None  # under the mutex: schedule() starts a new thread
                    self._changed.notify_all()
                    return
                job = self._jobs[0]
            if job.tokens is None and not self._render(job):
                self._done(job)
                continue
            if not self._lock.acquire_idle(self.ready, self._stopped):
                if self._lock.retired:  # the model is freed
                    with self._mutex:
                        self._closed = True
                continue
            try:
                with self._mutex:
                    current = any(j is job for j in self._jobs)
                finished = self._work(job) if current else True
            finally:
                self._lock.release()
            if finished:
                self._done(job)

    def _done(self, job: _Job) -> None:
        with self._mutex:
            if any(j is job for j in self._jobs):
                self._jobs.remove(job)
            self._changed.notify_all()

    def _render(self, job: _Job) -> bool:
        """Render the next turn's prefix (without the model lock: the template and the
        tokenizer only read the model). False when there is nothing to prefill."""
        cache = self._cache
        if getattr(getattr(cache.kv, "memory", None), "checkpoints", False):
            # Recurrent state is snapshotted at the end of every evaluation: one per
            # micro-batch would hold the whole state that many times. Not done for them yet.
            return False
        try:
            tokens = cache.template.prefix_tokens([*job.messages, job.reply], job.tools)
        except PrefixCacheError as exc:  # no stable boundary after the reply
            log.debug("reply not prefilled ahead: %s", exc)
            return False
        if len(tokens) + 1 > cache.kv.n_ctx:
            return False
        job.tokens = tokens
        return True

    def _work(self, job: _Job) -> bool:
        """Prefill what is left of ``job`` (holding the model lock) until done or told to
        yield; store what was done. True when the job is over (done, or failed)."""
        cache, kv = self._cache, self._cache.kv
        tokens = job.tokens
        assert tokens is not None
        if self._should_yield():
            return False
        try:
            prepared = cache._prepare(tokens, job.namespace, generating=False)
        except PrefixCacheError as exc:
            log.debug("reply not prefilled ahead: %s", exc)
            return True
        done = prepared.cached_tokens
        if job.start is None:
            job.start = done
        preempted = False
        try:
            for a, b in itertools.pairwise(_cuts(done, len(tokens), kv.unit)):
                if self._should_yield():
                    preempted = True
                    break
                t0 = time.perf_counter()
                kv.evaluate(tokens[a:b])
                seconds = time.perf_counter() - t0
                cache.calibration.observe_prefill(b - a, seconds)
                job.evaluated += b - a
                job.seconds += seconds
                with self._mutex:
                    self._stats.tokens += b - a
                    self._stats.seconds += seconds
        except Exception as exc:  # llama.cpp refused a batch: the next turn prefills it
            log.warning("prefilling a reply ahead failed (the next turn prefills it): %s", exc)
            kv.truncate(kv.exact)
            return True
        job.end = len(kv.live_tokens())
        with self._mutex:
            if preempted:
                self._stats.preempted += 1
            else:
                self._stats.runs += 1
            if job.evaluated and not job.counted:
                job.counted = True
                self._remembered.append(job)
        if job.save and job.end > job.start and not self._closed:
            cache._autosave(job.namespace, _prompt_of(tokens))
        return not preempted


def _cuts(start: int, end: int, unit: int) -> list[int]:
    """Batch edges from ``start`` to ``end``: one micro-batch each, none of one token."""
    cuts = list(range(start, end, unit))
    if len(cuts) > 1 and end - cuts[-1] == 1 and unit > 2:
        cuts[-1] -= 1  # ... unit, unit - 1, 2 instead of ... unit, unit, 1
    return [*cuts, end] if cuts else []


def _prompt_of(tokens: list[int]) -> Prepared:
    from .cache import Prepared  # cache imports this module

    return Prepared(tokens, 0, 0, 0.0)


#: Instances whose thread may be running: stopped at exit, before the models are freed.
_RUNNING: weakref.WeakSet[ReplyPrefill] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for ahead in list(_RUNNING):
        ahead.close(timeout=10.0)


__all__ = ["AheadStats", "ReplyPrefill"]
