"""What is in a store, read without loading a model: pins, segments, the tree, integrity.

The CLI's ``status``, ``tree``, ``verify`` and ``rm`` are thin layers over these functions; each
works on any Store and returns plain data (``to_dict`` for ``--json``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp

from .errors import CorruptSegmentError
from .fingerprint import Fingerprint, file_digest
from .lifecycle import chain_keys, check_pin_quota, pinned_keys
from .segment import Segment, Usage, checksum_matches
from .store.base import ReportsHealth, Store, StoreHealth

_CALIBRATION_DOC = "calibration:"
_FINGERPRINT_DOC = "fingerprint:"


@dataclass(frozen=True)
class PinRow:
    """One pinned (or formerly pinned) prefix."""

    name: str
    namespace: str
    tokens: int
    segments: int
    bytes: int  # KV bytes of its whole chain (shared segments count in every chain)
    pinned: bool  # False once its TTL ran out (its segments are then ordinary LRU entries)
    ttl_left_s: float | None
    hits: int  # restores of the chain's last segment
    last_used: float | None
    model: str
    source: str
    stored: bool  # False when its segments are gone (evicted after expiry, or removed)


@dataclass(frozen=True)
class ModelFigures:
    """The cost model measured for one model (fingerprint) on this machine."""

    model: str
    fingerprint: str
    prefill_tokens_per_s: float
    restore_bytes_per_s: float
    bytes_per_token: float
    #: How its prefixes are kept: "range", "swa_full" or "checkpoints" (prefixcache.memory).
    memory: str = "range"


@dataclass(frozen=True)
class StoreStatus:
    url: str
    pins: list[PinRow]
    segments: int
    tokens: int
    bytes: int
    pinned_bytes: int
    autosaved_segments: int
    autosaved_bytes: int
    quota_bytes: int | None
    models: list[ModelFigures] = field(default_factory=list)
    quarantined: int = 0
    # A shared store's reachability and room (None for a local store), and what to tell the
    # user about it: one line each (full / read-only, unreachable).
    shared: StoreHealth | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_kind(store: Store, fingerprint: str) -> str:
    """How segments of a fingerprint hold state: "range", "swa_full" or "checkpoints"."""
    doc = store.get_doc(_FINGERPRINT_DOC + fingerprint) or {}
    return str(doc.get("memory") or "range")


def model_name(store: Store, fingerprint: str) -> str:
    """The model file name recorded for a fingerprint (its digest's head if unknown)."""
    doc = store.get_doc(_FINGERPRINT_DOC + fingerprint) or {}
    path = doc.get("model_path")
    return Path(str(path)).name if path else fingerprint[:12]


def collect(store: Store, quota_bytes: int | None = None, now: float | None = None) -> StoreStatus:
    """A snapshot of the store: every pin with its size and use, totals, measured speeds."""
    now = time.time() if now is None else now
    segments = {s.key: s for s in store.segments()}
    usage = store.usage()
    pinned = pinned_keys(store, segments, now)
    names: dict[str, str] = {}

    def name_of(fp: str) -> str:
        if fp not in names:
            names[fp] = model_name(store, fp)
        return names[fp]

    rows = []
    for pin in sorted(store.pins(), key=lambda p: (p.name, p.root)):
        chain = chain_keys(pin.key, segments)
        last = segments.get(pin.key)
        use = usage.get(pin.key, Usage())
        rows.append(
            PinRow(
                name=pin.name,
                namespace=last.namespace if last else "",
                tokens=pin.n_tokens,
                segments=len(chain),
                bytes=sum(segments[k].nbytes for k in chain),
                pinned=not pin.expired(now),
                ttl_left_s=None if pin.expires is None else max(0.0, pin.expires - now),
                hits=use.hits,
                last_used=use.last_used or None,
                model=name_of(last.fingerprint) if last else "?",
                source=pin.source,
                stored=last is not None,
            )
        )
    total = sum(s.nbytes for s in segments.values())
    figures = []
    for fp in sorted({s.fingerprint for s in segments.values()}):
        cal = store.get_doc(_CALIBRATION_DOC + fp) or {}
        figures.append(
            ModelFigures(
                model=name_of(fp),
                fingerprint=fp,
                prefill_tokens_per_s=float(cal.get("prefill_tokens_per_s", 0.0)),
                restore_bytes_per_s=float(cal.get("restore_bytes_per_s", 0.0)),
                bytes_per_token=float(cal.get("bytes_per_token", 0.0)),
                memory=memory_kind(store, fp),
            )
        )
    unpinned = [s for k, s in segments.items() if k not in pinned]
    health = store.health() if isinstance(store, ReportsHealth) else None
    return StoreStatus(
        url=store.url,
        pins=rows,
        segments=len(segments),
        tokens=sum(len(s.tokens) for s in segments.values()),
        bytes=total,
        pinned_bytes=sum(segments[k].nbytes for k in pinned),
        autosaved_segments=len(unpinned),
        autosaved_bytes=sum(s.nbytes for s in unpinned),
        quota_bytes=quota_bytes,
        models=figures,
        quarantined=len(store.get_doc("quarantine") or {}),
        shared=health,
        notes=health_notes(health),
    )


def health_notes(health: StoreHealth | None) -> list[str]:
    """What a user should know about a shared store's state, one line each (none when fine)."""
    if health is None:
        return []
    if not health.reachable:
        return [
            f"shared store unreachable ({health.reason}): showing this host's local tier; "
            "workers carry on with it and share again when the store is back"
        ]
    if health.writable:
        return []
    room = ""
    if health.used_bytes is not None and health.limit_bytes:
        room = f" ({health.used_bytes / 1e9:.3f} of {health.limit_bytes / 1e9:.3f} GB maxmemory)"
    return [
        f"shared store is full{room}, so read-only: restores work, hits are not recorded, new "
        "segments stay on the host that made them and pinning fails. Make room: lower quota_gb "
        "and run gc, rm prefixes, or raise maxmemory"
        + (f" — the server says: {health.reason}" if health.reason else "")
    ]


# --- the tree --------------------------------------------------------------------------------


@dataclass
class TreeNode:
    segment: Segment
    pins: list[str]
    hits: int
    children: list[TreeNode] = field(default_factory=list)
    #: Its bytes are a whole-sequence checkpoint at its end (recurrent and hybrid models):
    #: a restore can stop only at the end of such a node.
    checkpoint: bool = False


def tree(store: Store) -> dict[str, list[TreeNode]]:
    """Stored segments as trees, one list of first segments per root (model + namespace)."""
    segments = {s.key: s for s in store.segments()}
    usage = store.usage()
    pins: dict[str, list[str]] = {}
    for pin in store.pins():
        pins.setdefault(pin.key, []).append(pin.name)
    kinds = {fp: memory_kind(store, fp) for fp in {s.fingerprint for s in segments.values()}}
    nodes = {
        k: TreeNode(
            s,
            sorted(pins.get(k, [])),
            usage.get(k, Usage()).hits,
            checkpoint=kinds[s.fingerprint] == "checkpoints",
        )
        for k, s in segments.items()
    }
    roots: dict[str, list[TreeNode]] = {}
    for node in sorted(nodes.values(), key=lambda n: (n.segment.start, n.segment.created)):
        parent = nodes.get(node.segment.parent)
        if parent is not None:
            parent.children.append(node)
        elif node.segment.is_first:
            roots.setdefault(node.segment.root, []).append(node)
    return roots


def walk(node: TreeNode) -> Iterator[TreeNode]:
    yield node
    for child in node.children:
        yield from walk(child)


# --- verify ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    key: str
    label: str
    kind: str  # "corrupt", "orphan" (parent gone), "fingerprint" (model or llama.cpp changed)
    detail: str


def verify(store: Store, *, fix: bool = False) -> tuple[int, list[Problem]]:
    """Check every segment's bytes against its checksum and its fingerprint against this machine.

    Returns (segments checked, problems). With ``fix``, corrupt and orphaned segments (and their
    descendants) are removed; segments of another model or llama.cpp version are only reported,
    since another installation may still use them.
    """
    segments = {s.key: s for s in store.segments()}
    problems: list[Problem] = []
    memo: dict[str, Any] = store.get_doc("model-digests") or {}
    fingerprints: dict[str, str | None] = {}
    largest = max((s.nbytes for s in segments.values()), default=0)
    buf = memoryview(bytearray(largest))
    for seg in sorted(segments.values(), key=lambda s: s.start):
        if seg.parent != seg.root and seg.parent not in segments:
            problems.append(Problem(seg.key, seg.label, "orphan", "its parent segment is gone"))
            continue
        view = buf[: seg.nbytes]
        try:
            store.read_kv(seg, view)
            if not checksum_matches(view, seg.checksum):
                raise CorruptSegmentError(seg.key, "checksum mismatch")
        except CorruptSegmentError as exc:
            problems.append(Problem(seg.key, seg.label, "corrupt", exc.reason))
            continue
        if seg.fingerprint not in fingerprints:
            fingerprints[seg.fingerprint] = _stale_reason(store, seg.fingerprint, memo)
        reason = fingerprints[seg.fingerprint]
        if reason:
            problems.append(Problem(seg.key, seg.label, "fingerprint", reason))
    if fix:
        doomed = {p.key for p in problems if p.kind in ("corrupt", "orphan")}
        for key in list(doomed):
            doomed.update(_descendants(key, segments))
        for key in doomed:
            store.delete(key)
    return len(segments), problems


def _stale_reason(store: Store, fingerprint: str, memo: dict[str, Any]) -> str | None:
    """Why segments of this fingerprint cannot be restored here any more, or None."""
    doc = store.get_doc(_FINGERPRINT_DOC + fingerprint)
    if doc is None:
        return "no fingerprint record: written by an unknown model or version"
    try:
        stored = Fingerprint.from_dict(doc)
    except (KeyError, TypeError, ValueError):
        return "unreadable fingerprint record"
    if stored.digest != fingerprint:
        return "fingerprint record does not match its digest"
    if stored.llama_cpp_version != llama_cpp.__version__:
        return (
            f"written by llama-cpp-python {stored.llama_cpp_version}, "
            f"this is {llama_cpp.__version__}"
        )
    path = doc.get("model_path")
    if not path or not Path(str(path)).is_file():
        return f"model file {path} is not on this machine (kept for others)"
    if file_digest(str(path), memo) != stored.model_sha256:
        return f"model file {path} changed since these segments were stored"
    return None


def _descendants(key: str, segments: dict[str, Segment]) -> set[str]:
    children: dict[str, list[str]] = {}
    for seg in segments.values():
        children.setdefault(seg.parent, []).append(seg.key)
    out: set[str] = set()
    todo = [key]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# --- removal ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    pins: int
    segments: int
    bytes_freed: int


def remove(store: Store, name: str, now: float | None = None) -> Removal:
    """Drop every pin called ``name`` and the segments only it needed.

    Segments shared with another pin's chain, or with stored children (other conversations that
    branch from them), stay.
    """
    now = time.time() if now is None else now
    with store.lock("evict", timeout=60):
        doomed_pins = [p for p in store.pins() if p.name == name]
        for pin in doomed_pins:
            store.delete_pin(pin.root, pin.name)
        segments = {s.key: s for s in store.segments()}
        keep = pinned_keys(store, segments, now)
        children: dict[str, int] = dict.fromkeys(segments, 0)
        for seg in segments.values():
            if seg.parent in children:
                children[seg.parent] += 1
        removed = freed = 0
        for pin in doomed_pins:
            for key in chain_keys(pin.key, segments):
                if key in keep or children.get(key, 0) > 0 or key not in segments:
                    break
                freed += store.delete(key)
                removed += 1
                children[segments[key].parent] = children.get(segments[key].parent, 1) - 1
                del segments[key]
        return Removal(len(doomed_pins), removed, freed)


def unpin(store: Store, name: str, now: float | None = None) -> int:
    """Let every pin called ``name`` expire now: its segments become ordinary LRU entries.

    The pin record stays (``status`` shows it as expired, ``pin`` makes it live again).
    """
    now = time.time() if now is None else now
    pins = [p for p in store.pins() if p.name == name and not p.expired(now)]
    for pin in pins:
        store.set_pin(replace(pin, expires=now))
    return len(pins)


def repin(store: Store, name: str, ttl: float | None, quota_bytes: int | None) -> int:
    """Make the pins called ``name`` live again (for ``ttl`` seconds, or for good)."""
    now = time.time()
    with store.lock("evict", timeout=60):
        pins = [p for p in store.pins() if p.name == name and store.get(p.key) is not None]
        for pin in pins:
            check_pin_quota(store, quota_bytes, [pin.key], 0, now)
            store.set_pin(replace(pin, expires=None if ttl is None else now + ttl))
    return len(pins)


__all__ = [
    "ModelFigures",
    "PinRow",
    "Problem",
    "Removal",
    "StoreStatus",
    "TreeNode",
    "collect",
    "remove",
    "repin",
    "tree",
    "unpin",
    "verify",
    "walk",
]
