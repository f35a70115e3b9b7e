"""JSON encoding of the small documents a store keeps (never pickle)."""

from __future__ import annotations

import json
from typing import Any


def encode_doc(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def decode_doc(text: str | bytes | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
