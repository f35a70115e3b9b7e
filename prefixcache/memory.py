"""Memory kinds: how each model family's state can be cut, stored and restored.

llama.cpp keeps a sequence's state in one of three shapes, and each needs its own rules:

- :class:`RangeKV` — per-token attention KV (LLaMA, Qwen, SmolLM, ...). Any token range can be
  captured and restored, so segments chain and a restore may stop inside one.
- :class:`SlidingWindow` — per-token KV where some layers attend to the last ``window`` tokens
  only (Gemma 2/3, gpt-oss). The context keeps every token (``swa_full``), but llama.cpp writes a
  sequence's sliding-window cells only for positions inside the window of its last token, so a
  segment longer than the window would come back with holes. Segments are therefore at most one
  window long, and a context whose sliding-window cells were reused is not trusted below them.
- :class:`Checkpointed` — recurrent state (Mamba, RWKV) or hybrids of it with attention (Jamba,
  Granite 4, LFM2, Nemotron-H). The recurrent state is one value per sequence that cannot be cut
  by token range, so it is snapshotted at segment ends (checkpoints) and a restore stops exactly
  at the end of the deepest segment the prompt reaches. A recurrent model's segment is the whole
  state; a hybrid's is its span's attention KV plus the recurrent state at its end, so a chain
  holds each token's KV once and is restored in order.

:func:`memory_for` picks the kind of a loaded model; adding a family means adding (or reusing)
a class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Memory:
    """The rules of one memory kind (see the module docstring)."""

    #: "range" (range-restorable KV), "swa_full" (sliding window) or "checkpoints".
    kind: str = "range"
    #: Whether segments carry a recurrent state snapshotted at their end (restores stop there).
    checkpoints: bool = False
    #: Whether segments are token ranges restored in chain order (checkpointed hybrids too: their
    #: span's attention KV plus the recurrent state at their end); False: whole-state snapshots.
    ranges: bool = True

    def segment_tokens(self, requested: int) -> int:
        """The longest segment this kind can store and restore whole."""
        return requested

    def describe(self) -> str:
        """One line for status: how prefixes of this model are kept."""
        return "range segments (per-token KV)"

    def usable(self, n: int, pos_min: int) -> bool:
        """Whether a sequence kept up to ``n`` tokens, whose memory starts at ``pos_min``, gives
        a cold run's results for the tokens that follow."""
        return True

    def restored_positions(self, start: int, end: int) -> tuple[int, int]:
        """The first and last position llama.cpp reports for a restored ``[start, end)``."""
        return start, end - 1


@dataclass(frozen=True)
class RangeKV(Memory):
    pass


@dataclass(frozen=True)
class SlidingWindow(Memory):
    kind: str = "swa_full"
    window: int = 0

    def segment_tokens(self, requested: int) -> int:
        return max(1, min(requested, self.window))

    def describe(self) -> str:
        return (
            f"swa_full: sliding window of {self.window} tokens, every token kept; "
            f"segments of at most {self.window} tokens"
        )

    def usable(self, n: int, pos_min: int) -> bool:
        # The token at position n attends to positions n - window + 1 .. n in the windowed layers.
        return n <= 0 or pos_min <= max(0, n - self.window)


@dataclass(frozen=True)
class Checkpointed(Memory):
    """Recurrent state, checkpointed at segment ends.

    A recurrent model's segment is the whole sequence state at its end. A hybrid's segment is
    its span's attention KV plus the recurrent state at its end (``ranges``): restoring a chain
    of them in order rebuilds the attention KV once, not once per checkpoint.
    """

    kind: str = "checkpoints"
    checkpoints: bool = True
    hybrid: bool = False
    ranges: bool = False

    def restored_positions(self, start: int, end: int) -> tuple[int, int]:
        # llama.cpp reports a hybrid sequence's range as its recurrent cell's: the last position.
        return end - 1, end - 1

    def describe(self) -> str:
        if self.hybrid:
            return (
                "checkpoints: attention KV by range plus the recurrent state at each segment's "
                "end; restores stop exactly on a segment end"
            )
        return (
            "checkpoints: recurrent state snapshotted whole at segment ends; restores stop "
            "exactly on a checkpoint"
        )


def memory_for(llm: llama_cpp.Llama) -> Memory:
    """The memory kind of a loaded model (UnsupportedModelError, naming its family and what to
    do instead, for a model whose state cannot be stored)."""
    model = llm._model.model
    if llama_cpp.llama_model_has_encoder(model):
        raise refuse(
            llm,
            "encoder-decoder models keep the encoder's output outside the sequence state, so a "
            "stored decoder prefix would not match the input it was made for",
            "run them with llama-cpp-python directly, without prefixcache",
        )
    if llama_cpp.llama_model_is_recurrent(model):
        return Checkpointed()
    if llama_cpp.llama_model_is_hybrid(model):
        return Checkpointed(hybrid=True, ranges=True)
    window = int(llama_cpp.llama_model_n_swa(model))
    if window > 0:
        return SlidingWindow(window=window)
    return RangeKV()


def family(llm: llama_cpp.Llama) -> str:
    """The model's architecture name from its GGUF metadata (for messages)."""
    meta: dict[str, Any] = getattr(llm, "metadata", {}) or {}
    return str(meta.get("general.architecture", "unknown"))


def refuse(llm: llama_cpp.Llama, why: str, instead: str) -> UnsupportedModelError:
    """An error that names the model family, why it cannot be cached and what to do."""
    return UnsupportedModelError(f"{family(llm)} models: {why}; {instead}")


__all__ = ["Checkpointed", "Memory", "RangeKV", "SlidingWindow", "family", "memory_for", "refuse"]
