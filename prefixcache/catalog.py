"""What is stored and how to find it: per-namespace radix indexes kept in step with the store.

Other processes write to the same store, so each lookup first brings the namespace's index up to
date. A store with a change log (:class:`~prefixcache.store.base.ChangeLog`: the disk and Redis
stores) answers with what changed for that namespace's root since the index last looked, so a
lookup costs one small query plus the changes, whatever else the store holds; indexes of the
last :data:`MAX_NAMESPACES` namespaces used are kept. A namespace of more than
:data:`FULL_LISTING_MAX` segments is indexed sparsely: a lookup reads only the stored
continuations of its own prompt, found by their heads (``ChangeLog.children``), so neither its
cost nor the index's memory grows with the namespace (docs/design.md). Any other store is
resynced the old way: when its generation counter moved, every key is listed and unknown
segments are read. A segment
that fails its checksum is quarantined (deleted with its descendants, and noted in the store); one
that is intact but cannot be used here (llama.cpp refuses it, or it is not authenticated with this
process's store key) is only skipped by this process: other hosts may use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import CorruptSegmentError, IncompatibleStateError
from .fingerprint import Fingerprint
from .radix import RadixIndex
from .segment import HEAD_TOKENS, Pin, Segment, checksum_matches, head_key, root_key
from .store import Store
from .store.base import ChangeLog, IndexDelta

#: Indexes of this many namespaces are kept (least recently used dropped first).
MAX_NAMESPACES = 16
#: A namespace of at most this many segments is indexed whole, from one listing (~30 us a
#: segment of 64 tokens: ~8 ms); a larger one sparsely, along the prompts looked up (a full
#: index that grows to twice as many is dropped and started again, which decides anew).
FULL_LISTING_MAX = 256
#: A sparse index holding more tokens than this (about 40 bytes each) is dropped at the next
#: lookup and started again from that lookup's prompt.
SPARSE_MAX_TOKENS = 1 << 18

log = logging.getLogger(__name__)


@dataclass
class Known:
    """Index of one namespace, with the segment metadata behind it."""

    index: RadixIndex = field(default_factory=RadixIndex)
    segments: dict[str, Segment] = field(default_factory=dict)
    seq: int = -1  # position in the store's change log this index reflects (-1: none yet)
    #: Stored segments whose parent is not indexed (deleted or not seen yet), by parent key:
    #: indexed as soon as their parent is (a parent stored again brings its chain back).
    waiting: dict[str, dict[str, Segment]] = field(default_factory=dict)
    #: Indexed along the prompts looked up only (the namespace is too large to list).
    sparse: bool = False
    #: Sparse only: for each indexed segment (None: the root), the next HEAD_TOKENS tokens of
    #: the prompts whose continuations after it were read from the store.
    probed: dict[str | None, set[tuple[int, ...]]] = field(default_factory=dict)
    held: int = 0  # tokens of the indexed segments
    #: Sparse only: the most tokens one walk has indexed (a prompt with many stored near
    #: misses along its path needs them all at once: the cap never drops below twice that).
    walk_peak: int = 0
    #: Sparse only: the prompt of the last walk, while nothing was indexed since (a prompt
    #: looked up again then needs no walk).
    walked: tuple[int, ...] | None = None

    def hold(self, seg: Segment, parent: str | None) -> None:
        """Index a segment whose parent (None: the root) is indexed."""
        if seg.key in self.index:
            return
        self.index.insert(seg.key, parent, seg.tokens)
        self.segments[seg.key] = seg
        self.held += len(seg.tokens)
        self.walked = None

    def cap(self) -> int:
        """Tokens a sparse index may hold before it is dropped and started again: the cap, or
        twice the largest walk (else a prompt whose walk alone is over the cap would drop and
        read its path again at every lookup)."""
        return max(SPARSE_MAX_TOKENS, 2 * self.walk_peak)

    def drop(self, key: str) -> None:
        """Unindex a segment that has no indexed children."""
        self.index.remove(key)
        self.walked = None
        seg = self.segments.pop(key, None)
        if seg is not None:
            self.held -= len(seg.tokens)
        self.probed.pop(key, None)


class Catalog:
    """The segments of one fingerprint in a store, indexed by namespace."""

    def __init__(self, store: Store, fingerprint: Fingerprint, key_id: str = ""):
        self.store = store
        self.fingerprint = fingerprint
        self.key_id = key_id  # the store key's public name: each key has a key space of its own
        self._known: dict[str, Known] = {}
        self._log = store if isinstance(store, ChangeLog) else None
        self._generation = -1
        self._explained = False
        #: Segments this process will not restore (key -> why), though they stay in the store.
        self.refused: dict[str, str] = {}

    def root(self, namespace: str) -> str:
        return root_key(self.fingerprint.digest, namespace, self.key_id)

    def sync(self, namespace: str, tokens: Sequence[int] | None = None) -> Known:
        """The namespace's index, brought up to date with the store (other processes write too).

        ``tokens``: the prompt about to be looked up. A sparse index (a large namespace) reads
        the stored continuations of this prompt that it has not read yet; without it, it holds
        only what earlier prompts brought in.
        """
        if self._log is not None:
            return self._follow(self._log, namespace, tokens)
        gen = self.store.generation()
        known = self._known.get(namespace)
        if known is not None and gen == self._generation:
            return known
        root = self.root(namespace)
        if known is None:
            known = self._known[namespace] = Known()
        stored = self.store.keys()
        for key in [k for k in known.segments if k not in stored]:
            self.forget(known, key)
        new = []
        for key in stored - known.segments.keys() - self.refused.keys():
            try:
                seg = self.store.get(key)
            except CorruptSegmentError as exc:
                log.warning("ignoring segment %s: %s", key[:16], exc.reason)
                continue
            if seg is not None and seg.root == root:
                new.append(seg)
        for seg in sorted(new, key=lambda s: s.start):
            parent = None if seg.parent == root else seg.parent
            if parent is not None and parent not in known.index:
                continue  # its parent is gone or refused: unreachable here
            known.hold(seg, parent)
        self._explain_miss(stored, known)
        # Other namespaces are refreshed on their next use.
        for ns in list(self._known):
            if ns != namespace:
                del self._known[ns]
        self._generation = gen
        return known

    def _follow(self, log_: ChangeLog, namespace: str, tokens: Sequence[int] | None) -> Known:
        """Apply the store's changes to the namespace's root since this index last looked."""
        known = self._known.pop(namespace, None)
        root = self.root(namespace)
        if known is not None and known.sparse and known.held > known.cap():
            known = Known(seq=known.seq, sparse=True)  # the log from there on still applies
        elif known is not None and not known.sparse and len(known.segments) > 2 * FULL_LISTING_MAX:
            known = None  # grown large: list it again, or follow it sparsely
        delta = log_.changes(root, -1 if known is None else known.seq, limit=FULL_LISTING_MAX)
        if known is None or delta.full:
            known = Known(sparse=delta.over)
        self._known[namespace] = known  # most recently used last
        while len(self._known) > MAX_NAMESPACES:
            del self._known[next(iter(self._known))]
        if known.sparse:
            self._follow_sparse(log_, known, root, delta, tokens)
            return known
        for key in delta.removed:
            self._removed(known, key)
        new = [
            s
            for s in delta.added
            if s.key not in known.segments and s.key not in self.refused and s.root == root
        ]
        if len(new) > 1:
            new.sort(key=lambda s: s.start)
        for seg in new:
            self._insert(known, root, seg)
        known.seq = delta.seq
        if not known.segments and not self._explained:
            self._explain_miss(self.store.keys(), known)
        return known

    # sparse indexes (large namespaces) ---------------------------------------------------------

    def _follow_sparse(
        self,
        log_: ChangeLog,
        known: Known,
        root: str,
        delta: IndexDelta,
        tokens: Sequence[int] | None,
    ) -> None:
        """Apply a delta to a sparse index, then read what the prompt's walk still lacks.

        A stored segment is indexed when its parent is and a probe there could have found it
        (its head is a prefix of the tokens probed); the rest are read when a walk needs them.
        """
        for key in delta.removed:
            if key in known.index:
                for k in [*known.index.descendants(key), key]:
                    known.drop(k)
        for seg in sorted(delta.added, key=lambda s: s.start):
            parent = None if seg.parent == root else seg.parent
            if not self._wanted(known, root, seg, parent):
                continue
            head = seg.tokens[:HEAD_TOKENS]
            if any(t[: len(head)] == head for t in known.probed.get(parent, ())):
                known.hold(seg, parent)
        known.seq = delta.seq
        if tokens is not None:
            toks = tuple(tokens)
            if toks != known.walked:
                self._walk(log_, known, root, toks)
                known.walked = toks

    def _wanted(self, known: Known, root: str, seg: Segment, parent: str | None) -> bool:
        """Whether a segment read from the store can be indexed now."""
        return (
            seg.root == root
            and seg.key not in known.segments
            and seg.key not in self.refused
            and (parent is None or parent in known.index)
        )

    def _walk(self, log_: ChangeLog, known: Known, root: str, toks: tuple[int, ...]) -> None:
        """Index the stored continuations of ``toks``: from the root, at each segment end that
        the prompt matches whole, read (once) the segments whose head matches what follows.

        One query per level of the walk, for every node of that level at once. A segment the
        prompt leaves within its first HEAD_TOKENS tokens is not found this way (at most
        HEAD_TOKENS - 1 tokens of reuse lost, docs/design.md).
        """
        before = known.held
        frontier: list[tuple[str | None, int]] = [(None, 0)]
        while frontier:
            need = []
            for p, e in frontier:
                t = toks[e : e + HEAD_TOKENS]
                if t and t not in known.probed.get(p, ()):
                    need.append((p, t))
            if need:
                heads = [head_key(p or root, t[:k]) for p, t in need for k in range(1, len(t) + 1)]
                found = log_.children(root, heads)
                for p, t in need:
                    known.probed.setdefault(p, set()).add(t)
                for seg in sorted(found, key=lambda s: s.start):
                    parent = None if seg.parent == root else seg.parent
                    if self._wanted(known, root, seg, parent):
                        known.hold(seg, parent)
            onward: list[tuple[str | None, int]] = []
            for p, e in frontier:
                kids = known.index.first() if p is None else known.index.children(p)
                for key in kids:
                    seg = known.segments[key]
                    end = e + len(seg.tokens)
                    if end < len(toks) and toks[e:end] == seg.tokens:
                        onward.append((key, end))
            frontier = onward
        known.walk_peak = max(known.walk_peak, known.held - before)

    @staticmethod
    def _removed(known: Known, key: str) -> None:
        """A segment left the store: drop it; its descendants wait for it to come back."""
        for parent in [p for p, w in known.waiting.items() if key in w]:  # rare: chains with holes
            del known.waiting[parent][key]
            if not known.waiting[parent]:
                del known.waiting[parent]
        if key not in known.index:
            known.segments.pop(key, None)
            return
        orphans = [known.segments[k] for k in known.index.descendants(key)]
        for k in [*(s.key for s in orphans), key]:
            known.drop(k)
        for s in orphans:
            known.waiting.setdefault(s.parent, {})[s.key] = s

    @staticmethod
    def _insert(known: Known, root: str, seg: Segment) -> None:
        """Index a segment, and whatever waited for it; park it if its parent is not indexed."""
        todo = [seg]
        while todo:
            s = todo.pop()
            parent = None if s.parent == root else s.parent
            if parent is not None and parent not in known.index:
                known.waiting.setdefault(s.parent, {})[s.key] = s
                continue
            known.hold(s, parent)
            todo.extend(known.waiting.pop(s.key, {}).values())

    def with_pins(self, known: Known, pins: Iterable[Pin]) -> list[Pin]:
        """``pins``, with the chain of each indexed (a sparse index holds only what prompts
        brought in; explaining a divergence inside a pin needs the pin's whole path)."""
        pins = list(pins)
        if not known.sparse:
            return pins
        now = time.time()
        for pin in pins:
            if pin.key in known.index or pin.expired(now):
                continue
            chain: list[Segment] = []
            key = pin.key
            while key != pin.root and key not in known.index:
                seg = self.store.get(key)
                if seg is None or seg.root != pin.root or key in self.refused:
                    break
                chain.append(seg)
                key = seg.parent
            else:
                for seg in reversed(chain):
                    known.hold(seg, None if seg.parent == pin.root else seg.parent)
        return pins

    def add(self, known: Known, seg: Segment) -> None:
        """Index a segment this process has just written."""
        root = self.root(seg.namespace)
        known.hold(seg, None if seg.parent == root else seg.parent)

    def wrote(self, generation_before: int, written: int) -> None:
        """Note that this process moved the store's generation by ``written`` (no resync needed
        unless someone else wrote too)."""
        after = self.store.generation()
        if after == generation_before + written and self._generation == generation_before:
            self._generation = after

    def forget(self, known: Known, key: str) -> list[str]:
        """Drop a segment and its descendants from the index (not from the store)."""
        if key not in known.index:
            known.segments.pop(key, None)
            return [key]
        doomed = [*known.index.descendants(key), key]
        for k in doomed:
            known.drop(k)
        return doomed

    def quarantine(self, known: Known, seg: Segment, reason: str) -> int:
        """Delete a segment whose bytes are damaged, with everything chained to it.

        Returns how many segments were removed (0 when it had already been evicted).
        """
        current = self.store.get(seg.key)
        if current is None:
            log.info("segment %s was evicted while restoring; prefilling instead", seg.key[:16])
            self.forget(known, seg.key)
            return 0
        if self._intact(current):
            # Another process deleted and stored it again (or an older version replaced its
            # bytes) between our read and now: what is stored is sound, only the read was not.
            log.info("segment %s changed while restoring; prefilling instead", seg.key[:16])
            if seg.key in known.segments:
                known.segments[seg.key] = current  # its checksum may be the new bytes' own
            return 0
        doomed = self.forget(known, seg.key)
        log.warning(
            "segment %s is corrupt (%s): quarantined with %d descendant(s); prefilling instead",
            seg.key[:16],
            reason,
            len(doomed) - 1,
        )
        notes = self.store.get_doc("quarantine") or {}
        notes[seg.key] = {"reason": reason, "time": time.time(), "descendants": len(doomed) - 1}
        self.store.set_doc("quarantine", notes)
        for key in doomed:
            self.store.delete(key)
        return len(doomed)

    def _intact(self, seg: Segment) -> bool:
        """Whether the segment's stored bytes, read afresh, match its checksum."""
        buf = bytearray(seg.nbytes)
        try:
            self.store.read_kv(seg, memoryview(buf))
        except CorruptSegmentError:
            return False
        return checksum_matches(buf, seg.checksum)

    def refuse(self, known: Known, seg: Segment, reason: str) -> None:
        """Stop restoring an intact segment in this process; it stays in the store for others."""
        if seg.key not in self.refused:
            log.warning(
                "segment %s is not restorable here (%s): kept in the store, prefilling instead",
                seg.key[:16],
                reason,
            )
        for key in self.forget(known, seg.key):
            self.refused[key] = reason

    def check_compatible(self, fingerprint_digest: str) -> None:
        """Raise IncompatibleStateError naming the field in which a stored fingerprint differs."""
        if fingerprint_digest == self.fingerprint.digest:
            return
        doc = self.store.get_doc("fingerprint:" + fingerprint_digest)
        if doc is None:
            raise IncompatibleStateError("fingerprint", fingerprint_digest, self.fingerprint.digest)
        stored = Fingerprint.from_dict(doc)
        self.fingerprint.require_equal(stored)
        raise IncompatibleStateError("fingerprint", fingerprint_digest, self.fingerprint.digest)

    def _explain_miss(self, stored: set[str], known: Known) -> None:
        """Log once why segments in the store are not usable here (another model or settings)."""
        if known.segments or self._explained or not stored:
            return
        self._explained = True
        for key in list(stored)[:50]:
            try:
                seg = self.store.get(key)
            except CorruptSegmentError:
                continue
            if seg is None or seg.fingerprint == self.fingerprint.digest:
                continue
            try:
                self.check_compatible(seg.fingerprint)
            except IncompatibleStateError as exc:
                log.warning("stored segments are not restorable here: %s", exc)
                return


__all__ = ["FULL_LISTING_MAX", "SPARSE_MAX_TOKENS", "Catalog", "Known"]
