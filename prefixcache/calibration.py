"""Measured speeds on this machine and model: the cost model that decides what autosave stores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Calibration:
    """Prefill rate and restore throughput, smoothed over the calls that measured them."""

    prefill_tokens_per_s: float = 0.0
    restore_bytes_per_s: float = 0.0
    restore_overhead_s: float = 0.002
    bytes_per_token: float = 0.0

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 8 and seconds > 0:
            self.prefill_tokens_per_s = _ema(self.prefill_tokens_per_s, tokens / seconds)

    def observe_restore(self, nbytes: int, tokens: int, seconds: float) -> None:
        if nbytes >= 1 << 20 and seconds > 0:
            self.restore_bytes_per_s = _ema(self.restore_bytes_per_s, nbytes / seconds)
        if tokens:
            self.bytes_per_token = nbytes / tokens

    def min_span_tokens(self) -> int:
        """Smallest span whose restore is cheaper than prefilling it again."""
        if not (self.prefill_tokens_per_s and self.restore_bytes_per_s and self.bytes_per_token):
            return 4
        per_token_gain = (
            1 / self.prefill_tokens_per_s - self.bytes_per_token / self.restore_bytes_per_s
        )
        if per_token_gain <= 0:
            return 1 << 30  # restoring is never cheaper: do not autosave
        return max(1, int(self.restore_overhead_s / per_token_gain) + 1)


def _ema(old: float, new: float, weight: float = 0.3) -> float:
    return new if old <= 0 else (1 - weight) * old + weight * new


__all__ = ["Calibration"]
