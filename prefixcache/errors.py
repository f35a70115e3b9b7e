"""The exceptions prefixcache raises.

Every error derives from :class:`PrefixCacheError`, so a caller (or the CLI) can catch one type
and print one line. Each subclass carries the fields a user needs to fix the problem.
"""

from __future__ import annotations

from pathlib import Path


class PrefixCacheError(Exception):
    """Root of every error raised by prefixcache."""


class ConfigError(PrefixCacheError):
    """A setting is missing or wrong: no model found, a bad store URL, a bad option."""


class RecipeError(PrefixCacheError):
    """A recipe cannot be loaded or used; names the file and, where known, the line."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class TemplateError(PrefixCacheError):
    """The chat template cannot render the messages, or cannot give a stable prefix boundary."""


class PromptTooLongError(PrefixCacheError):
    """A prompt (plus the tokens asked for) does not fit the context window."""

    def __init__(self, n_tokens: int, n_ctx: int, what: str = "prompt"):
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"{what} needs {n_tokens} tokens but the context holds {n_ctx}; "
            f"raise n_ctx or shorten the {what}"
        )


class IncompatibleStateError(PrefixCacheError):
    """Stored KV state was made under different settings and cannot be restored here."""

    def __init__(self, field: str, stored: object, current: object, what: str = "segment"):
        self.field = field
        self.stored = stored
        self.current = current
        super().__init__(
            f"{what} was stored with {field}={stored!r} but this model/context has "
            f"{field}={current!r}; re-prewarm it or open the cache with matching settings"
        )


class CorruptSegmentError(PrefixCacheError):
    """A stored segment failed its checksum or could not be read back whole."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"segment {key[:16]} is corrupt: {reason}")


class UnauthenticatedSegmentError(PrefixCacheError):
    """A stored segment has no valid MAC for this store key: refused, but kept in the store.

    Not a CorruptSegmentError: the bytes may be intact (written without a key, or with another
    one), so the segment is never quarantined; the prompt is prefilled instead.
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"segment {key[:16]} is not authenticated: {reason}")


class RequestError(PrefixCacheError):
    """A chat request that is malformed; ``param`` names the field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class SegmentRefusedError(PrefixCacheError):
    """An intact segment (its checksum holds) that llama.cpp will not load into this context.

    The segment is kept in the store, where other processes may use it; this one prefills.
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"segment {key[:16]} cannot be restored here: {reason}")


class StoreError(PrefixCacheError):
    """The store cannot be opened, read or written."""


class QuotaExceededError(StoreError):
    """Pinned segments alone would exceed the store's quota."""

    def __init__(self, pinned_bytes: int, quota_bytes: int, needed_bytes: int = 0):
        self.pinned_bytes = pinned_bytes
        self.quota_bytes = quota_bytes
        self.needed_bytes = needed_bytes
        super().__init__(
            f"pinning {needed_bytes / 1e9:.3f} GB more would exceed the quota: "
            f"{pinned_bytes / 1e9:.3f} GB already pinned of {quota_bytes / 1e9:.3f} GB; "
            "unpin something or raise the quota"
        )


class UnsupportedModelError(PrefixCacheError):
    """The model or context cannot have its KV state restored by token range."""


class StoreFullError(StoreError):
    """The shared store refuses new data: it is full (Redis ``maxmemory``) or read-only.

    Reads go on: restores still work, usage bookkeeping is skipped, a tiered store keeps new
    segments in its local tier, and pinning fails until room is made (lower ``quota_gb`` so
    that eviction frees space, unpin or remove prefixes, or raise ``maxmemory``).
    """

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"shared store {url} refuses writes: {reason}")


__all__ = [
    "ConfigError",
    "CorruptSegmentError",
    "IncompatibleStateError",
    "PrefixCacheError",
    "PromptTooLongError",
    "QuotaExceededError",
    "RecipeError",
    "RequestError",
    "SegmentRefusedError",
    "StoreError",
    "StoreFullError",
    "TemplateError",
    "UnauthenticatedSegmentError",
    "UnsupportedModelError",
]
