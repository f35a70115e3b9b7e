"""Storage backends, chosen by URL: a path for the local store, ``redis://`` for a shared one."""

from __future__ import annotations

import os

from ..config import default_store
from ..errors import ConfigError
from .base import GcReport, Store
from .disk import DiskStore


def open_store(spec: str | os.PathLike[str] | Store | None = None) -> Store:
    """Open a store from a path or URL (None: ``$PREFIXCACHE_DIR`` or the user cache dir)."""
    if spec is None:
        spec = default_store()
    if isinstance(spec, Store):
        return spec
    text = os.fspath(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis stores are not available in this build: {text}")
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"unknown store URL scheme: {text} (expected a path or redis://)")
    return DiskStore(text.removeprefix("file://"))


__all__ = ["DiskStore", "GcReport", "Store", "open_store"]
