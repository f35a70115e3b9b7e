"""Storage backends, chosen by URL: a path for the local store, ``redis://`` for a shared one."""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import TypeVar

from ..config import default_store, user_cache_dir
from ..errors import ConfigError
from .base import GcReport, Store
from .disk import DiskStore

T = TypeVar("T")

#: URL schemes of a shared Redis store.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str | os.PathLike[str] | Store | None = None) -> Store:
    """Open a store from a path or URL (None: ``$PREFIXCACHE_DIR`` or the user cache dir).

    A ``redis://``, ``rediss://`` or ``unix://`` URL opens a store shared through Redis with a
    local tier on this host in front of it (see docs/redis.md). The URL's ``local`` query
    parameter names the local tier's directory; ``local=none`` opens the Redis store alone.
    Without it the local tier is :func:`default_local_tier` of the URL. ``local_gb`` is the
    local tier's quota (default: :func:`~prefixcache.store.tiered.default_local_quota`),
    ``write_back_mb`` bounds the copies waiting for it, ``retry_after`` is in seconds.
    """
    if spec is None:
        spec = default_store()
    if isinstance(spec, Store):
        return spec
    text = os.fspath(spec)
    if text.startswith(REDIS_SCHEMES):
        return _open_redis(text)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"unknown store URL scheme: {text} (expected a path or redis://)")
    return DiskStore(text.removeprefix("file://"))


def default_local_tier(url: str) -> Path:
    """Where the local tier of a Redis store lives by default: one folder per server and prefix.

    ``<user cache dir>/prefixcache-redis/<host>-<port>-<db>-<prefix>-<hash>``, outside any
    DiskStore directory (whose own housekeeping would delete files it does not know).
    """
    from .redis import redact, split_url

    plain, ours = split_url(url)
    server = redact(plain).split("://", 1)[1].rsplit("@", 1)[-1].split("?", 1)[0]
    name = f"{server}-{ours.get('prefix', 'pc')}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80]
    digest = hashlib.sha256(f"{plain}|{ours.get('prefix', '')}".encode()).hexdigest()[:12]
    return user_cache_dir() / "prefixcache-redis" / f"{slug}-{digest}"


def _open_redis(url: str) -> Store:
    try:
        from .redis import RedisStore, redact, split_url
        from .tiered import DEFAULT_RETRY_AFTER_S, DEFAULT_WRITE_BACK_MB, TieredStore
    except ImportError as exc:  # the optional dependency
        raise ConfigError(
            f"redis stores need the redis package: pip install 'prefixcache[redis]' ({exc})"
        ) from None
    _, ours = split_url(url)
    remote = RedisStore(url)
    local = ours.get("local")
    if local is not None and local.lower() == "none":
        return remote
    if local == "":
        raise ConfigError(f"redis URL {redact(url)}: local= needs a directory or 'none'")
    retry_after = _number(url, ours, "retry_after", DEFAULT_RETRY_AFTER_S, "seconds")
    local_gb = _number(url, ours, "local_gb", None, "a size in GB")
    write_back_mb = _number(url, ours, "write_back_mb", DEFAULT_WRITE_BACK_MB, "a size in MB")
    return TieredStore(
        DiskStore(local or default_local_tier(url)),
        remote,
        retry_after=retry_after,
        local_quota=None if local_gb is None else int(local_gb * 1e9),
        write_back_bytes=int(write_back_mb * 2**20),
    )


def _number(url: str, ours: dict[str, str], name: str, default: T, what: str) -> float | T:
    """The URL option ``name`` as a number >= 0 (``default`` when absent)."""
    from .redis import redact

    if name not in ours:
        return default
    try:
        value = float(ours[name])
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"redis URL {redact(url)}: {name} must be {what}, not {ours[name]!r}")
    return value


__all__ = ["DiskStore", "GcReport", "Store", "default_local_tier", "open_store"]
