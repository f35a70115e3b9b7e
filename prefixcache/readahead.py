"""Reading segments ahead of their restore.

A chain of segments is restored one after another, and each must be checksummed (and, with a
store key, authenticated) before llama.cpp sees its bytes. With a store that maps its files
(:class:`prefixcache.store.base.MapsKV`) the next segment is mapped and checked on a worker
thread while llama.cpp loads the current one (its call releases the GIL), so the checks hide
behind the loads instead of adding to them. The order, and what is checked before what is
loaded, stay those of loading the segments one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress

from .errors import CorruptSegmentError
from .integrity import Integrity
from .segment import Segment, checksum_matches
from .store.base import MapsKV

Verified = tuple[ExitStack, memoryview]


def check(seg: Segment, data: memoryview, integrity: Integrity) -> None:
    """Raise CorruptSegmentError (or UnauthenticatedSegmentError) unless ``data`` are the
    segment's bytes as written."""
    if not checksum_matches(data, seg.checksum):
        raise CorruptSegmentError(seg.key, "checksum mismatch")
    integrity.verify(seg, data)


def _verified(store: MapsKV, seg: Segment, integrity: Integrity) -> Verified:
    """The segment's bytes, checked; the stack closes their mapping."""
    stack = ExitStack()
    try:
        view = stack.enter_context(store.map_kv(seg))
        if view is None:  # not mappable: a private copy (another may be read meanwhile)
            view = memoryview(bytearray(seg.nbytes))
            store.read_kv(seg, view)  # type: ignore[attr-defined]
        check(seg, view, integrity)
    except BaseException:
        stack.close()
        raise
    return stack, view


@contextmanager
def _opened(future: Future[Verified]) -> Iterator[memoryview]:
    stack, view = future.result()
    with stack:
        yield view


def reader() -> ThreadPoolExecutor:
    """The worker thread a cache reads ahead on (one, kept: the store's connection is per
    thread, and opening one per restore would cost more than it saves)."""
    return ThreadPoolExecutor(1, thread_name_prefix="prefixcache-read")


@contextmanager
def read_ahead(
    pool: ThreadPoolExecutor, store: MapsKV, segs: Sequence[Segment], integrity: Integrity
) -> Iterator[Iterator[tuple[Segment, AbstractContextManager[memoryview]]]]:
    """Pairs of a segment and its checked bytes (a context manager, raising what the checks
    raise), in order; the segment after the one being used is read meanwhile on ``pool``.

    Leaving the block early (a segment refused) drops what was read ahead, unused.
    """
    pending: list[Future[Verified]] = []

    def pairs() -> Iterator[tuple[Segment, AbstractContextManager[memoryview]]]:
        if segs:
            pending.append(pool.submit(_verified, store, segs[0], integrity))
        for i, seg in enumerate(segs):
            if i + 1 < len(segs):
                pending.append(pool.submit(_verified, store, segs[i + 1], integrity))
            yield seg, _opened(pending.pop(0))

    try:
        yield pairs()
    finally:
        for future in pending:
            if not future.cancel():
                with suppress(Exception):  # never used: its failure is nobody's concern
                    future.result()[0].close()


__all__ = ["check", "read_ahead", "reader"]
