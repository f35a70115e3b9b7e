"""Cache reads and writes counted per API, for ``/metrics``.

Each HTTP API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
``/v1/messages``) records, per call, the prompt tokens it read from the cache and the prompt
tokens it wrote to it, in that API's own terms: the OpenAI APIs read ``cached_tokens`` and write
what they prefilled (autosave stores it); the Anthropic API reads ``cache_read_input_tokens`` and
writes ``cache_creation_input_tokens``. The per-model counters (``prefixcache_cached_tokens``
and so on) stay the totals over all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

_LABELS = ["api", "model"]


class APICacheCounters:
    """Calls, cache hits and cache read/write tokens by ``(api, model)``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (api, model) → [calls, hits, read tokens, written tokens]
        self._counts: dict[tuple[str, str], list[int]] = {}

    def record(self, api: str, model: str, *, read_tokens: int, write_tokens: int) -> None:
        """Count one call of ``api`` on ``model`` (a hit when it read any token)."""
        with self._lock:
            row = self._counts.setdefault((api, model), [0, 0, 0, 0])
            row[0] += 1
            row[1] += 1 if read_tokens > 0 else 0
            row[2] += max(0, read_tokens)
            row[3] += max(0, write_tokens)

    def record_call(self, api: str, model: str, calls: Sequence[Any]) -> None:
        """Count the call that ran (the last one a ``start`` made, as the server traces them)
        from its ``prepared``: read = cached tokens, written = the prompt tokens it prefilled.

        Read once the call's first chunk is out (its restore is done by then); a call that
        failed before its restore counts nothing.
        """
        prepared = getattr(calls[-1], "prepared", None) if calls else None
        if prepared is None:
            return
        read = int(prepared.reused_tokens)
        self.record(api, model, read_tokens=read, write_tokens=prepared.prompt_tokens - read)

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        with self._lock:
            return {k: (v[0], v[1], v[2], v[3]) for k, v in self._counts.items()}

    def collect(self) -> Iterator[Metric]:
        """The Prometheus families (read at scrape time)."""
        rows = sorted(self.snapshot().items())
        families = [
            CounterMetricFamily("prefixcache_api_calls", "Generation calls by API", labels=_LABELS),
            CounterMetricFamily(
                "prefixcache_api_cache_hits",
                "Calls that read from the cache, by API",
                labels=_LABELS,
            ),
            CounterMetricFamily(
                "prefixcache_api_cache_read_tokens",
                "Prompt tokens read from the cache, by API (OpenAI cached_tokens, Anthropic "
                "cache_read_input_tokens)",
                labels=_LABELS,
            ),
            CounterMetricFamily(
                "prefixcache_api_cache_write_tokens",
                "Prompt tokens written to the cache, by API (OpenAI: prefilled and autosaved; "
                "Anthropic cache_creation_input_tokens)",
                labels=_LABELS,
            ),
        ]
        for (api, model), values in rows:
            for family, value in zip(families, values, strict=True):
                family.add_metric([api, model], float(value))
        yield from families


__all__ = ["APICacheCounters"]
