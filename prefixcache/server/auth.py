"""API keys: where the server gets them, how a request's key is checked, and its tenant namespace.

Keys can come from ``--api-key`` (visible to anyone who can run ``ps``), from files
(``--api-key-file``, one key a line) or from ``$PREFIXCACHE_API_KEYS`` (comma-separated); the
last two keep them out of the process list. A request's key is compared with every configured
key in constant time (``hmac.compare_digest`` over SHA-256 digests, so neither the length nor the
position of a match shows in the response time). Each key is a tenant whose store namespace is a
hash of the key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Environment variable holding API keys, comma-separated.
API_KEYS_ENV = "PREFIXCACHE_API_KEYS"


def namespace_for(api_key: str | None) -> str:
    """The store namespace of one API key ("" without keys): a hash, never the key itself."""
    if not api_key:
        return ""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


def read_api_keys(
    keys: Iterable[str] = (),
    files: Iterable[str | os.PathLike[str]] = (),
    *,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Every configured key, once each: ``keys``, then each file's, then ``$PREFIXCACHE_API_KEYS``.

    A key file holds one key a line; blank lines and lines starting with ``#`` are skipped, and
    surrounding whitespace is dropped. A file others may read is used, with a warning. ``environ``
    defaults to ``os.environ``, read at call time.

    Raises ConfigError for a file that cannot be read or holds no key.
    """
    env = os.environ if environ is None else environ
    found = list(keys)
    for file in files:
        found.extend(_read_key_file(Path(file)))
    found.extend(env.get(API_KEYS_ENV, "").split(","))
    stripped = (k.strip() for k in found)
    return list(dict.fromkeys(k for k in stripped if k))


def _read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text("utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"API key file {path}: {reason}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"API key file {path} holds no key (one a line; # starts a comment)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s can be read by other users; chmod 600 it", path)
    return keys


class ApiKeys:
    """The keys a server accepts, checked in constant time; empty means no authentication."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def valid(self, key: str) -> bool:
        """Whether ``key`` is one of the keys; every key is compared, whichever matches."""
        given = _digest(key)
        match = False
        for digest in self._digests:
            match |= hmac.compare_digest(given, digest)
        return match

    def from_header(self, authorization: str) -> str | None:
        """The key of an ``Authorization: Bearer <key>`` header if it is valid, else None."""
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or not self.valid(key):
            return None
        return key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


__all__ = ["API_KEYS_ENV", "ApiKeys", "namespace_for", "read_api_keys"]
