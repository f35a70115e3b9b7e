"""Segments: the unit of stored KV state, and the hash chain that names them.

A segment is a token span ``[start, start + len(tokens))`` of one conversation prefix plus the KV
state of that span. Its key hashes its parent's key and its own tokens, and the chain starts from
a root that hashes the model fingerprint and the namespace. Equal prefixes therefore get equal
keys (writes are idempotent, branches share their common segments), and a key from one model or
tenant can never be found by another.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from .errors import CorruptSegmentError

#: Bumped when the key derivation or the metadata layout changes.
FORMAT = "prefixcache/1"


def root_key(fingerprint_digest: str, namespace: str = "", key_id: str = "") -> str:
    """The parent key of every first segment for one fingerprint and namespace.

    ``key_id`` (``Integrity.key_id``) gives each store key a key space of its own, so writers
    with different keys (or none) never occupy each other's segment keys; without one the root
    is the one stores had before keys existed.
    """
    parts = [FORMAT, fingerprint_digest, namespace, *([key_id] if key_id else [])]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def tokens_bytes(tokens: Iterable[int]) -> bytes:
    """Token ids as little-endian int32 bytes (the same on every platform)."""
    arr = array("i", tokens)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def segment_key(parent_key: str, tokens: Iterable[int]) -> str:
    """Key of the segment holding ``tokens`` right after the segment (or root) ``parent_key``."""
    h = hashlib.sha256(bytes.fromhex(parent_key))
    h.update(tokens_bytes(tokens))
    return h.hexdigest()


#: A segment's head is its parent and its first this many tokens (fewer if it is shorter): a
#: lookup that cannot hold a whole namespace's index finds the stored continuations of a prefix
#: by their heads (see ``ChangeLog.children`` and docs/design.md).
HEAD_TOKENS = 8


def head_key(parent_key: str, tokens: Sequence[int]) -> str:
    """The head of a segment continuing ``parent_key`` with ``tokens``: a hash of the parent
    and ``tokens[:HEAD_TOKENS]``; pass exactly the tokens the head covers when probing."""
    h = hashlib.blake2b(b"head:" + parent_key.encode(), digest_size=16)
    h.update(tokens_bytes(tokens[:HEAD_TOKENS]))
    return h.hexdigest()


def checksum(data: Any) -> str:
    """Checksum of KV bytes: XXH3-64, fast enough (~25 GB/s) to verify on every restore."""
    return f"xxh3:{xxhash.xxh3_64_intdigest(data):016x}"


def checksum_matches(data: Any, expected: str) -> bool:
    """Whether ``data`` has the checksum ``expected``, computed with the algorithm it names.

    Segments stored by earlier versions carry CRC-32 checksums (``crc32:``); they stay readable.
    """
    algorithm, _, _ = expected.partition(":")
    if algorithm == "xxh3":
        return checksum(data) == expected
    if algorithm == "crc32":
        return f"crc32:{zlib.crc32(data):08x}" == expected
    return False


@dataclass(frozen=True)
class Segment:
    """Metadata of one stored segment (the KV bytes live beside it in the store)."""

    key: str
    parent: str  # parent segment key, or the root key for a first segment
    root: str  # root key: fingerprint + namespace
    start: int
    tokens: tuple[int, ...]
    nbytes: int
    checksum: str
    fingerprint: str  # fingerprint digest
    namespace: str = ""
    created: float = 0.0
    label: str = ""  # a human hint: the pin or recipe name, or "autosave"
    mac: str = ""  # keyed MAC over the metadata and bytes (integrity.py); "" without a store key

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def is_first(self) -> bool:
        return self.parent == self.root

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Segment:
        """Parse and validate stored metadata; anything malformed is a CorruptSegmentError."""
        try:
            data = json.loads(text)
            seg = cls(
                key=str(data["key"]),
                parent=str(data["parent"]),
                root=str(data["root"]),
                start=int(data["start"]),
                tokens=tuple(map(int, data["tokens"])),
                nbytes=int(data["nbytes"]),
                checksum=str(data["checksum"]),
                fingerprint=str(data["fingerprint"]),
                namespace=str(data.get("namespace", "")),
                created=float(data.get("created", 0.0)),
                label=str(data.get("label", "")),
                mac=str(data.get("mac", "")),  # absent from records of stores without a key
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptSegmentError("?", f"unreadable metadata ({exc})") from exc
        if segment_key(seg.parent, seg.tokens) != seg.key or seg.start < 0 or seg.nbytes <= 0:
            raise CorruptSegmentError(seg.key, "metadata does not match its key")
        return seg


@dataclass
class Usage:
    """Mutable bookkeeping of a segment: hits and recency, for LRU eviction and status."""

    hits: int = 0
    last_used: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Usage:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            return cls(hits=int(data.get("hits", 0)), last_used=float(data.get("last_used", 0)))
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True)
class Pin:
    """A named pinned prefix: its last segment and, through the parent chain, all the others."""

    name: str
    key: str  # the last segment of the pinned chain
    root: str
    n_tokens: int
    created: float
    expires: float | None = None  # after this the segments become ordinary LRU entries
    source: str = ""  # recipe file, if any
    digest: str = ""  # recipe content digest, to tell whether the pin is current
    extra: dict[str, Any] = field(default_factory=dict)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Pin:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            key=str(data["key"]),
            root=str(data["root"]),
            n_tokens=int(data["n_tokens"]),
            created=float(data["created"]),
            expires=None if data.get("expires") is None else float(data["expires"]),
            source=str(data.get("source", "")),
            digest=str(data.get("digest", "")),
            extra=dict(data.get("extra") or {}),
        )
