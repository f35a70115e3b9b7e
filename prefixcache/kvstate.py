"""The llama.cpp boundary: capture and restore KV state by token range (or, for recurrent and
hybrid models, as whole-sequence checkpoints; see :mod:`prefixcache.memory`).

This is the only module that calls llama.cpp's state API. It works on a context with two
sequences in one unified KV buffer: sequence 0 is the conversation, sequence 1 is scratch. A span
``[a, b)`` is captured by copying it to sequence 1 and serialising that sequence; it is restored by
loading the bytes into sequence 1 and copying them onto sequence 0. Restoring spans in order gives
the same KV as evaluating them. Everything is validated before it reaches llama.cpp, whose
failures abort the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import llama_cpp
from llama_cpp import _internals
from llama_cpp import _logger as _llama_logger

from .errors import (
    CorruptSegmentError,
    PrefixCacheError,
    PromptTooLongError,
    SegmentRefusedError,
    UnsupportedModelError,
)
from .fingerprint import Fingerprint, file_digest
from .memory import SlidingWindow, memory_for

log = logging.getLogger(__name__)

CONVERSATION = 0
SCRATCH = 1

Progress = Callable[[int, int], None]


class KVContext(Protocol):
    """What the runtime needs from a model context (implemented by :class:`LlamaKV`)."""

    n_ctx: int
    n_vocab: int
    owner: str | None

    def live_tokens(self) -> array: ...
    def validate(self, tokens: Sequence[int], extra: int = 0) -> None: ...
    def truncate(self, n: int) -> None: ...
    def evaluate(self, tokens: Sequence[int], progress: Progress | None = None) -> None: ...
    def capture(self, start: int, end: int) -> bytearray: ...
    def restore(self, data: Any, nbytes: int, start: int, tokens: Sequence[int]) -> None: ...


class LlamaKV:
    """Range-wise KV capture and restore on a ``llama_cpp.Llama``.

    Adopting a Llama whose context has a single sequence replaces its context with an equivalent
    one that has the scratch sequence (same parameters, ``n_seq_max=2``, ``kv_unified=True``).
    """

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        #: How this model family's state is cut, stored and restored (see prefixcache.memory).
        self.memory = memory_for(llm)
        self._ensure_scratch_sequence()
        self.n_ctx = int(llm.n_ctx())
        self.n_batch = int(llm.n_batch)
        #: llama.cpp computes a batch in micro-batches of this many tokens (see suffix_start).
        self.unit = int(llm.context_params.n_ubatch) or self.n_batch
        if self.n_batch % self.unit:
            raise UnsupportedModelError(
                f"n_batch ({self.n_batch}) must be a multiple of n_ubatch ({self.unit}) for "
                "restored prefixes to give exactly a cold run's output"
            )
        self.n_vocab = int(llm.n_vocab())
        self._buffer = bytearray()
        #: Checkpointed memory: whole-sequence snapshots taken while evaluating, by position.
        self._snapshots: dict[int, tuple[int, bytes]] = {}

    # context management ---------------------------------------------------------------------

    def _ensure_scratch_sequence(self) -> None:
        llm = self.llm
        ctx = llm._ctx.ctx
        params = llm.context_params
        auto_fa = params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        # Sliding-window models keep every token's KV (swa_full), or no prefix could be kept.
        swa = isinstance(self.memory, SlidingWindow)
        ready = llama_cpp.llama_n_seq_max(ctx) >= 2 and params.kv_unified and not auto_fa
        if ready and (params.swa_full or not swa):
            return
        params.n_seq_max = 2
        params.kv_unified = True
        if swa:
            params.swa_full = True
        with _llama_log_lines() as lines:
            new = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
        if auto_fa:
            # The fingerprint must name the attention llama.cpp chose: the V cache layout (and
            # so the stored bytes) differs with and without flash attention.
            params.flash_attn_type = _resolved_flash_attn(lines)
        old = llm._ctx
        llm._ctx = new
        old.close()
        llm._stack.callback(new.close)  # Llama.close() frees the new context too
        if getattr(llm, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)  # type: ignore[misc]
            scales = (ctypes.c_float * 1)(llm.lora_scale)
            llama_cpp.llama_set_adapters_lora(new.ctx, adapters, 1, scales)
        llm.n_tokens = 0
        llm._requires_eval = True
        log.debug("replaced the context with a two-sequence unified one")

    @property
    def _mem(self) -> Any:
        return llama_cpp.llama_get_memory(self.llm._ctx.ctx)

    def fingerprint(self, memo: dict[str, Any] | None = None) -> Fingerprint:
        llm = self.llm
        p = llm.context_params
        lora = ""
        if getattr(llm, "lora_path", None):
            lora = f"{file_digest(str(llm.lora_path), memo)}@{llm.lora_scale}"
        gpu = bool(llama_cpp.llama_supports_gpu_offload()) and llm.model_params.n_gpu_layers != 0
        return Fingerprint(
            model_sha256=file_digest(llm.model_path, memo),
            llama_cpp_version=str(llama_cpp.__version__),
            type_k=int(p.type_k),
            type_v=int(p.type_v),
            flash_attn=int(p.flash_attn_type),
            kv_unified=bool(p.kv_unified),
            swa_full=bool(p.swa_full),
            rope_scaling_type=int(p.rope_scaling_type),
            rope_freq_base=float(p.rope_freq_base),
            rope_freq_scale=float(p.rope_freq_scale),
            yarn_ext_factor=float(p.yarn_ext_factor),
            yarn_attn_factor=float(p.yarn_attn_factor),
            yarn_beta_fast=float(p.yarn_beta_fast),
            yarn_beta_slow=float(p.yarn_beta_slow),
            yarn_orig_ctx=int(p.yarn_orig_ctx),
            lora=lora,
            embeddings=bool(p.embeddings),
            backend="gpu" if gpu else "cpu",
        )

    # validation -----------------------------------------------------------------------------

    def validate(self, tokens: Sequence[int], extra: int = 0) -> None:
        """Check token ids and length (plus ``extra`` tokens to generate) against the context."""
        need = len(tokens) + extra
        if need > self.n_ctx:
            raise PromptTooLongError(need, self.n_ctx)
        if tokens and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            bad = next(t for t in tokens if t < 0 or t >= self.n_vocab)
            raise PrefixCacheError(
                f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})"
            )

    # the conversation sequence --------------------------------------------------------------

    def live_tokens(self) -> array:
        """Live tokens whose KV is exactly what a batched prefill gives.

        Tokens decoded one at a time during generation get KV that differs (in the last bits)
        from a batched prefill of the same tokens, so reusing or storing it would make output
        differ from a cold run. Only the first ``exact`` live tokens are trusted; the runtime
        moves that mark to the end of each prompt, which the Llama always prefills in batches.
        """
        n = min(self.llm.n_tokens, self.exact)
        return array("i", self.llm.input_ids[:n].tolist())

    @property
    def exact(self) -> int:
        return int(getattr(self.llm, "_prefixcache_exact", 0))

    @exact.setter
    def exact(self, n: int) -> None:
        self.llm._prefixcache_exact = n  # type: ignore[attr-defined]

    @property
    def owner(self) -> str | None:
        """The namespace whose call left the live KV (None: unknown, e.g. a plain Llama call)."""
        return getattr(self.llm, "_prefixcache_owner", None)

    @owner.setter
    def owner(self, namespace: str | None) -> None:
        self.llm._prefixcache_owner = namespace  # type: ignore[attr-defined]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens of sequence 0 and forget the rest.

        Memory that cannot be cut there (recurrent state short of its end, sliding-window
        cells reused below the window) is emptied instead: ``llm.n_tokens`` says what is kept.
        """
        n = max(0, min(n, self.llm.n_tokens))
        mem = self._mem
        kept = llama_cpp.llama_memory_seq_rm(mem, CONVERSATION, n, -1)
        if n > 0 and kept:
            kept = self.memory.usable(n, llama_cpp.llama_memory_seq_pos_min(mem, CONVERSATION))
        if not kept:
            llama_cpp.llama_memory_seq_rm(mem, CONVERSATION, -1, -1)
            n = 0
        self._snapshots = {p: b for p, b in self._snapshots.items() if p <= n}
        self.llm.n_tokens = n
        self.exact = min(self.exact, n)
        self.llm._requires_eval = True

    # Batch numerics. On llama.cpp's CPU backend a token evaluated in a micro-batch of its own
    # (a matrix-vector product) gets KV and logits that differ in the last bits from the same
    # token evaluated beside others (matrix-matrix); every batch of two or more tokens gives
    # bit-identical results, however the prompt is cut. A cold run puts a token alone only when
    # it is the last prompt token and lands at a multiple of the micro-batch size. So stored KV
    # never comes from a batch of one, and the suffix left for llama-cpp-python to evaluate is
    # chosen so that its last token is alone exactly when the cold run's is.

    def suffix_start(self, n_prompt: int, cached: int, *, generating: bool = True) -> int:
        """How many of ``cached`` live prompt tokens to keep so the rest evaluates like a cold run.

        ``generating``: llama-cpp-python evaluates the suffix (in n_batch chunks from the kept
        position, at least one token) and samples from its last token's logits. Otherwise the
        suffix goes through :meth:`evaluate`, which never makes a batch of one itself.

        When the cold run evaluates the last token alone (the prompt is one token past a
        multiple of the micro-batch), what is cached is kept, and :meth:`fill_gap` evaluates the
        gap up to the last token in batches of two or more before llama-cpp-python evaluates
        the last token alone: only a gap of exactly one token costs one kept token.
        """
        unit = self.unit
        s = max(1, n_prompt - cached) if generating else n_prompt - cached
        if not generating:
            return n_prompt - (2 if s == 1 and n_prompt >= 2 else s)
        if (n_prompt - 1) % unit == 0:  # the cold run evaluates the last token alone: so must we
            keep = n_prompt - s
            if s == 2 and unit > 1:  # a gap of one token would be a batch of one
                keep -= 1
            return max(0, keep)
        if s % unit == 1:  # it does not: never leave a batch of one at the end
            s += 1
        return max(0, n_prompt - s)

    def fill_gap(self, tokens: Sequence[int]) -> int:
        """Evaluate the gap :meth:`suffix_start` leaves between the kept tokens and a last prompt
        token that must be evaluated alone; returns the tokens evaluated (0: no gap).

        Nothing is done when nothing is kept: llama-cpp-python then evaluates the whole prompt
        as the cold run does.
        """
        n = len(tokens)
        start = self.llm.n_tokens
        if (n - 1) % self.unit or not 0 < start < n - 1:
            return 0
        self.evaluate(tokens[start : n - 1])
        return n - 1 - start

    def last_token_alone(self, n_prompt: int, start: int) -> bool:
        """Whether llama-cpp-python evaluates the prompt's last token alone from ``start`` on."""
        return (n_prompt - start) % self.unit == 1 or self.unit == 1

    def evaluate(
        self,
        tokens: Sequence[int],
        progress: Progress | None = None,
        *,
        stops: Sequence[int] = (),
        last_alone: bool = False,
    ) -> None:
        """Append ``tokens`` to sequence 0, in batches of at most one micro-batch, none of one
        token (unless ``tokens`` is one token: callers keep that from happening).

        Checkpointed memory is snapshotted at its end and at the absolute positions ``stops``
        (those that leave no batch of one). ``last_alone``: evaluate the last token in a batch of
        its own, as a cold run does when it lands on a micro-batch boundary.
        """
        start = self.llm.n_tokens
        self.validate(list(self.live_tokens()) + list(tokens))
        total = len(tokens)
        ends = {start + total}
        if self.memory.checkpoints:
            ends.update(p for p in stops if start + 2 <= p <= start + total - 2)
        if last_alone and total >= 1:
            ends.add(start + total - 1)
        done = start
        for end in sorted(ends):
            self._evaluate_run(tokens[done - start : end - start], progress, done - start, total)
            if self.memory.checkpoints and end > done and (end < start + total or not last_alone):
                self._snapshots[end] = self._snapshot(done, end)
            done = end
        assert self.llm.n_tokens == start + total
        # A token evaluated alone has KV (and state) unlike a batched prefill's: not trusted.
        self.exact = self.llm.n_tokens - (1 if last_alone and total >= 2 else 0)

    def _evaluate_run(
        self, tokens: Sequence[int], progress: Progress | None, offset: int, total: int
    ) -> None:
        n = len(tokens)
        if n == 0:
            return
        cuts = list(range(0, n, self.unit))
        if n > 1 and n - cuts[-1] == 1 and self.unit > 2:
            cuts[-1] -= 1  # ... unit, unit - 1, 2 instead of ... unit, unit, 1
        for a, b in itertools.pairwise([*cuts, n]):
            self.llm.eval(tokens[a:b])
            if progress is not None:
                progress(offset + b, total)

    # capture and restore --------------------------------------------------------------------

    def capture(self, start: int, end: int) -> bytearray:
        """Serialise the KV of positions ``[start, end)`` of sequence 0 (checkpointed memory:
        the whole sequence's state at ``end``)."""
        if not 0 <= start < end <= self.llm.n_tokens:
            raise ValueError(f"cannot capture [{start}, {end}) of {self.llm.n_tokens} live tokens")
        if self.memory.checkpoints:
            return self._checkpoint(start, end)
        return self._capture_range(start, end)

    def _capture_range(self, start: int, end: int) -> bytearray:
        """Copy ``[start, end)`` of sequence 0 to the scratch sequence and serialise that (a
        hybrid's recurrent state comes along whole: the state after all live tokens)."""
        ctx = self.llm._ctx.ctx
        mem = self._mem
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, CONVERSATION, SCRATCH, start, end)
        try:
            size = llama_cpp.llama_state_seq_get_size(ctx, SCRATCH)
            out = bytearray(size)
            buf = (ctypes.c_uint8 * size).from_buffer(out)
            written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, SCRATCH)
            del buf
        finally:
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
        if written != size:
            raise RuntimeError(f"llama.cpp wrote {written} of {size} state bytes")
        return out

    def _snapshot(self, start: int, end: int) -> tuple[int, bytes]:
        """What checkpointed memory keeps of the state after ``end`` tokens, evaluated on from
        ``start``: ``(first position its bytes cover, bytes)``."""
        if self.memory.ranges:
            return start, bytes(self._capture_range(start, end))
        return 0, bytes(self._sequence_state())

    def checkpoint_cuts(self, at: int, end: int) -> list[int] | None:
        """Where a span ``[at, end)`` of checkpointed memory can be cut into stored segments
        (the inner edges), or None when the states it needs were not snapshotted."""
        if end not in self._snapshots:
            exact_now = self.llm.n_tokens == end == self.exact
            return [] if exact_now else None
        if not self.memory.ranges:
            return sorted(p for p in self._snapshots if at < p < end)
        cuts = []
        first = self._snapshots[end][0]
        while first > at and first in self._snapshots:  # walk back along the snapshots' spans
            cuts.append(first)
            first = self._snapshots[first][0]
        return sorted(cuts) if first == at else None

    def _checkpoint(self, start: int, end: int) -> bytearray:
        if end in self._snapshots:
            first, data = self._snapshots[end]
            if first == start or not self.memory.ranges:
                return bytearray(data)
        elif self.llm.n_tokens == end == self.exact:
            return bytearray(self._snapshot(start, end)[1])
        raise ValueError(f"no checkpoint of the state after {end} tokens from {start} was taken")

    def _sequence_state(self) -> bytearray:
        """The whole state of sequence 0, as llama.cpp serialises it."""
        ctx = self.llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, CONVERSATION)
        out = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(out)
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, CONVERSATION)
        del buf
        if written != size:
            raise RuntimeError(f"llama.cpp wrote {written} of {size} state bytes")
        return out

    def restore_checkpoint(self, data: Any, nbytes: int, start: int, tokens: Sequence[int]) -> None:
        """Replace sequence 0 by a checkpoint: the state after the segment ``tokens`` that
        starts at ``start`` (the caller puts the ``start`` tokens before it in ``input_ids``).

        The bytes must already be checksummed; on failure sequence 0 is left empty.
        """
        llm = self.llm
        end = start + len(tokens)
        buf = self._state_buffer(data, nbytes, end)
        ctx = llm._ctx.ctx
        mem = self._mem
        self.truncate(0)
        loaded = llama_cpp.llama_state_seq_set_data(ctx, buf, nbytes, CONVERSATION)
        del buf  # it may point into a mapping that the caller closes
        hi = llama_cpp.llama_memory_seq_pos_max(mem, CONVERSATION)
        if not loaded or hi != end - 1:
            llama_cpp.llama_memory_seq_rm(mem, CONVERSATION, -1, -1)
            raise SegmentRefusedError(
                "?",
                f"llama.cpp rejected the checkpoint (loaded={loaded}, last position {hi}, "
                f"expected {end - 1})",
            )
        llm.input_ids[start:end] = tokens
        llm.n_tokens = end
        self.exact = end
        self._snapshots = {}
        llm._requires_eval = True

    def _state_buffer(self, data: Any, nbytes: int, end: int) -> Any:
        """``nbytes`` of ``data`` as the ctypes array llama.cpp reads a state from (the same
        memory when ``data`` is writable, a copy otherwise), for a state that ends at ``end``."""
        if end > self.n_ctx:
            raise PromptTooLongError(end, self.n_ctx, "restored prefix")
        view = memoryview(data).cast("B")
        if len(view) < nbytes:
            raise CorruptSegmentError("?", "buffer shorter than the segment")
        if view.readonly:
            return (ctypes.c_uint8 * nbytes).from_buffer_copy(view[:nbytes])
        return (ctypes.c_uint8 * nbytes).from_buffer(view)

    def buffer(self, nbytes: int) -> memoryview:
        """A reusable buffer to read segment bytes into (no allocation per restore)."""
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(nbytes)
        return memoryview(self._buffer)[:nbytes]

    def restore(self, data: Any, nbytes: int, start: int, tokens: Sequence[int]) -> None:
        """Load a captured span onto the end of sequence 0, which must hold exactly ``start``.

        The bytes must already be checksummed; llama.cpp still checks their layout, and the
        positions they land on are checked here. On failure sequence 0 is left at ``start``.
        """
        if self.memory.checkpoints and not self.memory.ranges:
            self.restore_checkpoint(data, nbytes, start, tokens)
            return
        llm = self.llm
        if llm.n_tokens != start:
            raise ValueError(f"restore at {start} but {llm.n_tokens} tokens are live")
        end = start + len(tokens)
        buf = self._state_buffer(data, nbytes, end)
        ctx = llm._ctx.ctx
        mem = self._mem
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
        try:
            loaded = llama_cpp.llama_state_seq_set_data(ctx, buf, nbytes, SCRATCH)
            lo = llama_cpp.llama_memory_seq_pos_min(mem, SCRATCH)
            hi = llama_cpp.llama_memory_seq_pos_max(mem, SCRATCH)
            if not loaded or (lo, hi) != self.memory.restored_positions(start, end):
                raise SegmentRefusedError(
                    "?",
                    f"llama.cpp rejected the state (loaded={loaded}, positions {lo}..{hi}, "
                    f"expected {start}..{end - 1})",
                )
            llama_cpp.llama_memory_seq_cp(mem, SCRATCH, CONVERSATION, -1, -1)
        finally:
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
            del buf
        llm.input_ids[start:end] = tokens
        llm.n_tokens = end
        self.exact = end
        llm._requires_eval = True


#: Log lines collected by :func:`_llama_log_lines`, per thread (llama.cpp logs a context's
#: creation on the thread that creates it).
_captures: dict[int, list[str]] = {}


@llama_cpp.llama_log_callback
def _forward_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """The log callback prefixcache installs once and never frees: it hands each line to
    llama-cpp-python's own logger, and to the capture of the thread logging, if any. (A
    callback made per capture and unset after it could be freed while another thread's
    llama.cpp call was still about to invoke it: a segfault, seen with concurrent loads.)"""
    try:
        lines = _captures.get(threading.get_ident())
        if lines is not None:
            lines.append(text.decode("utf-8", "replace"))
        _llama_logger.llama_log_callback(level, text, user_data)
    except Exception:  # a line logged while the interpreter shuts down: nowhere to put it
        pass


@contextlib.contextmanager
def _llama_log_lines() -> Iterator[list[str]]:
    """Collect the llama.cpp log lines of this thread while the block runs (they still reach
    llama-cpp-python's logger)."""
    lines: list[str] = []
    me = threading.get_ident()
    _captures[me] = lines
    llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p(0))  # the same, never-freed callback
    try:
        yield lines
    finally:
        del _captures[me]


def _resolved_flash_attn(log_lines: Sequence[str]) -> int:
    """What llama.cpp made of ``flash_attn_type=auto`` for a context, from its log."""
    text = "".join(log_lines)
    if "Flash Attention enabled" in text:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    if "Flash Attention not supported" in text:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    log.warning("cannot tell whether llama.cpp enabled flash attention; keyed as 'auto'")
    return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
