"""Storage backends, chosen by URL: a path for the local store, ``redis://`` for a shared one."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..config import default_store, user_cache_dir
from ..errors import ConfigError
from .base import GcReport, Store
from .disk import DiskStore

#: URL schemes of a shared Redis store.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str | os.PathLike[str] | Store | None = None) -> Store:
    """Open a store from a path or URL (None: ``$PREFIXCACHE_DIR`` or the user cache dir).

    A ``redis://``, ``rediss://`` or ``unix://`` URL opens a store shared through Redis with a
    local tier on this host in front of it (see docs/redis.md). The URL's ``local`` query
    parameter names the local tier's directory; ``local=none`` opens the Redis store alone.
    Without it the local tier is :func:`default_local_tier` of the URL.
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
        from .tiered import DEFAULT_RETRY_AFTER_S, TieredStore
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
    try:
        retry_after = float(ours.get("retry_after", DEFAULT_RETRY_AFTER_S))
    except ValueError:
        raise ConfigError(f"redis URL {redact(url)}: retry_after must be seconds") from None
    return TieredStore(DiskStore(local or default_local_tier(url)), remote, retry_after=retry_after)


__all__ = ["DiskStore", "GcReport", "Store", "default_local_tier", "open_store"]
