"""The fingerprint: everything that decides whether stored KV state can be reused.

Two contexts with equal fingerprints produce identical KV bytes for identical tokens, so a segment
made under one restores correctly under the other. Anything that changes the bytes or their layout
is a field here: the model file's content, the llama.cpp build, KV cache types, RoPE/YaRN settings,
adapters, the attention layout and the compute backend.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import IncompatibleStateError


@dataclass(frozen=True)
class Fingerprint:
    model_sha256: str
    llama_cpp_version: str
    type_k: int
    type_v: int
    flash_attn: int
    kv_unified: bool
    swa_full: bool
    rope_scaling_type: int
    rope_freq_base: float
    rope_freq_scale: float
    yarn_ext_factor: float
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_orig_ctx: int
    lora: str  # "" or "<sha256 of adapter>@<scale>"
    embeddings: bool
    backend: str  # "cpu" or "gpu": float results differ between them

    @property
    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def differences(self, other: Fingerprint) -> list[str]:
        """Names of the fields whose values differ."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def require_equal(self, stored: Fingerprint, what: str = "segment") -> None:
        """Raise IncompatibleStateError naming the first field that differs."""
        for name in self.differences(stored):
            raise IncompatibleStateError(name, getattr(stored, name), getattr(self, name), what)


def file_digest(path: str | os.PathLike[str], memo: dict[str, Any] | None = None) -> str:
    """SHA-256 of a file, remembered in ``memo`` by path, size and mtime so it is computed once."""
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and isinstance(memo.get(ident), str):
        return str(memo[ident])
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[ident] = digest
    return digest
