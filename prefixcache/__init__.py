"""prefixcache: pin, prewarm and restore KV prefixes for llama.cpp agents.

Declare the stable prefix of an agent's prompts once, store its KV state on disk, and at run time
restore the longest stored prefix of every prompt so that only the new suffix is evaluated.
"""

from .cache import PinInfo, PrefixCache, Prepared, Stats
from .calibration import Calibration
from .errors import (
    ConfigError,
    CorruptSegmentError,
    IncompatibleStateError,
    PrefixCacheError,
    PromptTooLongError,
    QuotaExceededError,
    RecipeError,
    RequestError,
    SegmentRefusedError,
    StoreError,
    StoreFullError,
    TemplateError,
    UnauthenticatedSegmentError,
    UnsupportedModelError,
)
from .explain import Explanation
from .fingerprint import Fingerprint
from .radix import Match, RadixIndex
from .segment import Pin, Segment
from .store import DiskStore, Store, open_store
from .stream import Stream

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "ConfigError",
    "CorruptSegmentError",
    "DiskStore",
    "Explanation",
    "Fingerprint",
    "IncompatibleStateError",
    "Match",
    "Pin",
    "PinInfo",
    "PrefixCache",
    "PrefixCacheError",
    "Prepared",
    "PromptTooLongError",
    "QuotaExceededError",
    "RadixIndex",
    "RecipeError",
    "RequestError",
    "Segment",
    "SegmentRefusedError",
    "Stats",
    "Store",
    "Stream",
    "StoreError",
    "StoreFullError",
    "TemplateError",
    "UnauthenticatedSegmentError",
    "UnsupportedModelError",
    "open_store",
]
