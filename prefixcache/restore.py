"""Loading stored segments onto the live KV: their bytes, checked, handed to llama.cpp.

A chain is loaded in order, and the checksum of each segment (XXH3 over its mapped bytes, which
holds the GIL) runs while llama.cpp loads the segment before it on a helper thread (ctypes lets
go of the GIL for the call): the two are about as long as each other, so a chain of several
segments loads in not much more than llama.cpp's own time. Bytes reach llama.cpp only once
checked: a corrupt file is never parsed by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager

from .kvstate import LlamaKV
from .segment import Segment
from .store import Store
from .store.base import MapsKV


@contextmanager
def segment_bytes(
    store: Store, kv: LlamaKV, seg: Segment, before_shared: Callable[[], None] = lambda: None
) -> Iterator[memoryview]:
    """A segment's KV bytes for the block: mapped from the store where it can (no copy:
    llama.cpp loads them from the page cache), else read into the context's reusable buffer
    (``before_shared`` is called first: whatever still reads that buffer must be done)."""
    if isinstance(store, MapsKV):
        with store.map_kv(seg) as view:
            if view is not None:
                yield view
                return
    before_shared()
    buf = kv.buffer(seg.nbytes)
    store.read_kv(seg, buf)
    yield buf


class _Stop(Exception):
    """The segment in flight failed: load nothing after it."""


class ChainLoader:
    """Loads chains of segments onto one context, checking each next one meanwhile."""

    def __init__(
        self,
        store: Store,
        kv: LlamaKV,
        check: Callable[[Segment, memoryview], None],
        failures: tuple[type[Exception], ...],
    ):
        self.store = store
        self.kv = kv
        #: Raises one of ``failures`` when the bytes may not be loaded (checksum, MAC).
        self.check = check
        #: What a segment that cannot be loaded raises (reading, checking or loading it).
        self.failures = failures
        self._pool: ThreadPoolExecutor | None = None

    def load(
        self, chain: Sequence[Segment], failed: Callable[[Segment, Exception], None]
    ) -> list[Segment]:
        """Load ``chain`` in order onto the end of the live KV, up to the first segment that
        cannot be (given to ``failed`` with its error); returns the segments loaded."""
        loaded: list[Segment] = []
        pending: tuple[Segment, Future[None]] | None = None

        def settle() -> bool:
            """Wait for the segment in flight; False if it could not be loaded."""
            nonlocal pending
            if pending is None:
                return True
            seg, future = pending
            pending = None
            try:
                future.result()
            except self.failures as exc:
                failed(seg, exc)
                return False
            loaded.append(seg)
            return True

        def before_shared() -> None:
            if not settle():
                raise _Stop

        with ExitStack() as held:  # each segment's bytes stay mapped until llama.cpp has them
            try:
                for seg in chain:
                    try:
                        buf = held.enter_context(
                            segment_bytes(self.store, self.kv, seg, before_shared)
                        )
                        self.check(seg, buf)
                    except _Stop:
                        break
                    except self.failures as exc:
                        if settle():  # as if read after the one before had loaded
                            failed(seg, exc)
                        break
                    if not settle():
                        break
                    future = self._executor().submit(
                        self.kv.restore, buf, seg.nbytes, seg.start, seg.tokens
                    )
                    pending = (seg, future)
                settle()
            finally:
                if pending is not None:  # an unexpected error: unmap only once llama.cpp is done
                    wait([pending[1]])
        return loaded

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefixcache-restore")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
