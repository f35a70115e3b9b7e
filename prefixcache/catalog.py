"""What is stored and how to find it: per-namespace radix indexes kept in step with the store.

Other processes write to the same store, so each lookup first brings the namespace's index up to
date. A store with a change log (:class:`~prefixcache.store.base.ChangeLog`: the disk and Redis
stores) answers with what changed for that namespace's root since the index last looked, so a
lookup costs one small query plus the changes, whatever else the store holds; indexes of the
last :data:`MAX_NAMESPACES` namespaces used are kept. Any other store is resynced the old way:
when its generation counter moved, every key is listed and unknown segments are read. A segment
that fails its checksum is quarantined (deleted with its descendants, and noted in the store); one
that is intact but cannot be used here (llama.cpp refuses it, or it is not authenticated with this
process's store key) is only skipped by this process: other hosts may use it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .errors import CorruptSegmentError, IncompatibleStateError
from .fingerprint import Fingerprint
from .radix import RadixIndex
from .segment import Segment, root_key
from .store import Store
from .store.base import ChangeLog

#: Indexes of this many namespaces are kept (least recently used dropped first).
MAX_NAMESPACES = 16

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

    def sync(self, namespace: str) -> Known:
        """The namespace's index, brought up to date with the store (other processes write too)."""
        if self._log is not None:
            return self._follow(self._log, namespace)
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
            known.index.insert(seg.key, parent, seg.tokens)
            known.segments[seg.key] = seg
        self._explain_miss(stored, known)
        # Other namespaces are refreshed on their next use.
        for ns in list(self._known):
            if ns != namespace:
                del self._known[ns]
        self._generation = gen
        return known

    def _follow(self, log_: ChangeLog, namespace: str) -> Known:
        """Apply the store's changes to the namespace's root since this index last looked."""
        known = self._known.pop(namespace, None)
        root = self.root(namespace)
        delta = log_.changes(root, -1 if known is None else known.seq)
        if known is None or delta.full:
            known = Known()
        self._known[namespace] = known  # most recently used last
        while len(self._known) > MAX_NAMESPACES:
            del self._known[next(iter(self._known))]
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
            known.index.remove(k)
            known.segments.pop(k, None)
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
            known.index.insert(s.key, parent, s.tokens)
            known.segments[s.key] = s
            todo.extend(known.waiting.pop(s.key, {}).values())

    def add(self, known: Known, seg: Segment) -> None:
        """Index a segment this process has just written."""
        root = self.root(seg.namespace)
        known.index.insert(seg.key, None if seg.parent == root else seg.parent, seg.tokens)
        known.segments[seg.key] = seg

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
            known.index.remove(k)
            known.segments.pop(k, None)
        return doomed

    def quarantine(self, known: Known, seg: Segment, reason: str) -> int:
        """Delete a segment whose bytes are damaged, with everything chained to it.

        Returns how many segments were removed (0 when it had already been evicted).
        """
        if self.store.get(seg.key) is None:
            log.info("segment %s was evicted while restoring; prefilling instead", seg.key[:16])
            self.forget(known, seg.key)
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


__all__ = ["Catalog", "Known"]
