"""The runtime: restore the longest stored prefix of each prompt, evaluate only the suffix.

:class:`PrefixCache` ties the layers together: the chat template turns messages into tokens, the
radix index finds the longest stored prefix, the store hands back KV bytes, and :mod:`kvstate`
loads them into the model. After each call the new part of the conversation is stored as child
segments (autosave), so the next turn of an agent loop restores everything but its newest message.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import llama_cpp

from . import checkpoint, config, generate
from .ahead import ReplyPrefill
from .calibration import Calibration
from .catalog import Catalog, Known
from .errors import (
    CorruptSegmentError,
    PrefixCacheError,
    SegmentRefusedError,
    StoreError,
    TemplateError,
    UnauthenticatedSegmentError,
)
from .explain import REASONS, Divergence, Explanation, PinReader, check_restore, restore_failed
from .explain import explain as _explain
from .integrity import Integrity
from .kvstate import LlamaKV, Progress
from .lifecycle import EVICTION_LOCK_TIMEOUT_S, Eviction, check_pin_quota, enforce_quota
from .radix import Match, as_tokens, common_prefix_length
from .restore import ChainLoader
from .segment import Pin, Segment, checksum, checksum_matches, segment_key
from .store import Store, open_store
from .stream import model_lock
from .template import ChatTemplate, Message
from .tools import ToolParser, get_parser, parser_for_template

log = logging.getLogger(__name__)

Tools = Sequence[Mapping[str, Any]] | None

#: Segments are cut at multiples of this many tokens (and at message boundaries when pinning),
#: so that a change in the middle of a long prefix re-evaluates only from the changed chunk on.
DEFAULT_SEGMENT_TOKENS = 1024
#: A shared head shorter than this is duplicated into a new segment rather than split out.
SPLIT_MIN_TOKENS = 64
_CALIBRATION_DOC = "calibration:"
#: What a store can raise when it is down, full or unwritable (storing and bookkeeping are
#: optimisations: these never fail a call whose answer is ready).
_STORE_FAILURES = (StoreError, OSError)
#: What a segment that cannot be loaded raises: it is then prefilled instead.
_LOAD_FAILURES = (
    CorruptSegmentError,
    SegmentRefusedError,
    UnauthenticatedSegmentError,
    *_STORE_FAILURES,
)


@dataclass
class Stats:
    """Counters since the cache was opened (see :meth:`PrefixCache.stats`)."""

    calls: int = 0
    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    restored_tokens: int = 0
    prefill_tokens: int = 0
    restore_seconds: float = 0.0
    prefill_seconds: float = 0.0
    bytes_restored: int = 0
    segments_restored: int = 0
    segments_saved: int = 0
    bytes_saved: int = 0
    corrupt_segments: int = 0  # failed their checksum: quarantined
    refused_segments: int = 0  # intact, but not restorable here: kept, prefilled instead
    store_errors: int = 0  # store reads or writes that failed; the call went on without them
    #: Calls whose prompt left a stored prefix, by reason (``prefixcache.explain.REASONS``;
    #: every key present from the start, so a reader copying the dict never sees it grow).
    partial_restores: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


@dataclass(frozen=True)
class Prepared:
    """What :meth:`PrefixCache.prepare` did for one prompt."""

    tokens: list[int]
    cached_tokens: int  # prompt tokens whose KV is in the context now (live or restored)
    restored_tokens: int  # of those, tokens loaded from the store by this call
    restore_seconds: float
    #: Where the prompt left a stored prefix (None if it did not); see PrefixCache.explain.
    diverged: Divergence | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens)

    @property
    def reused_tokens(self) -> int:
        """Tokens the model will not prefill (it always re-evaluates the last prompt token)."""
        return min(self.cached_tokens, len(self.tokens) - 1)


@dataclass(frozen=True)
class PinInfo:
    name: str
    key: str
    n_tokens: int
    evaluated_tokens: int  # tokens prefilled to pin it (0 when it was all stored already)
    new_segments: int
    new_bytes: int


class PrefixCache:
    """A token-level prefix cache for one ``llama_cpp.Llama``.

    Args:
        llm: the model; its context is given a scratch sequence if it lacks one.
        store: a path, a URL or a Store (None: ``$PREFIXCACHE_DIR`` or the user cache dir).
        namespace: keeps tenants apart: segments of one namespace are never seen by another.
        autosave: store the new part of every conversation after each call.
        prefill_replies: the default of ``chat(prefill_replies=...)``: prefill each reply in the
            background for the next turn (see :meth:`prefill_ahead`).
        quota_gb: store size limit; unpinned segments are evicted LRU beyond it.
        segment_tokens: chunk size of stored segments.
        store_key: a secret shared by the processes that trust each other's segments (None:
            ``$PREFIXCACHE_STORE_KEY`` if set). Segments are then signed with a keyed MAC and
            unsigned or wrongly signed ones are refused (see docs/security.md).
        tool_parser: how the model writes tool calls (a name from
            ``prefixcache.tools.PARSERS`` or a ToolParser; None: chosen from the chat template).
        chat_template: a Jinja chat template (its text or the path of a file holding it) to use
            instead of the one in the model's metadata.
        chat_format: a chat format registered in llama-cpp-python ("gemma", "chatml",
            "llama-3", ...) to use instead; give at most one of the two. With neither and no
            template in the model, ``complete()`` works and ``chat()`` says what to pass.
    """

    def __init__(
        self,
        llm: llama_cpp.Llama,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        namespace: str = "",
        autosave: bool = True,
        prefill_replies: bool = True,
        quota_gb: float | None = None,
        segment_tokens: int = DEFAULT_SEGMENT_TOKENS,
        store_key: str | bytes | None = None,
        tool_parser: str | ToolParser | None = None,
        chat_template: str | os.PathLike[str] | None = None,
        chat_format: str | None = None,
    ):
        self.llm = llm
        self._lock = model_lock(llm)
        with self._lock:
            self.kv = LlamaKV(llm)
        self.template = ChatTemplate(llm, chat_template, chat_format=chat_format)
        self.tool_parser = (
            get_parser(tool_parser)
            if tool_parser is not None
            else parser_for_template(self.template.source, self.template.native_tools)
        )
        self.store = open_store(store)
        self.namespace = namespace
        self.autosave = autosave
        self.prefill_replies = prefill_replies
        self.quota_bytes = None if quota_gb is None else int(quota_gb * 1e9)
        self.segment_tokens = self.kv.memory.segment_tokens(segment_tokens)
        self._stats = Stats()
        #: Replies prefilled in the background for the next turn (see prefixcache.ahead).
        self.ahead = ReplyPrefill(self)
        self._reported: set[tuple[str, type]] = set()
        #: Segments restored whose hits are not recorded yet: a call records them once its reply
        #: is made, so that the store's bookkeeping writes are not on the way to its first token.
        self._hits: list[str] = []
        self.integrity = Integrity.from_config(store_key)
        self._loader = ChainLoader(self.store, self.kv, self._check, _LOAD_FAILURES)
        # The memo of model-file digests decides the fingerprint: with a store key it is sealed
        # (and kept per key), so a writer without the key cannot pass one model off as another.
        key_id = self.integrity.key_id
        memo_doc = "model-digests" + (":" + key_id if key_id else "")
        memo = self.integrity.unseal(memo_doc, self.store.get_doc(memo_doc)) or {}
        self.fingerprint = self.kv.fingerprint(memo)
        try:
            self.store.set_doc(memo_doc, self.integrity.seal(memo_doc, memo))
            self.store.set_doc(
                "fingerprint:" + self.fingerprint.digest,
                {
                    **self.fingerprint.to_dict(),
                    "model_path": str(llm.model_path),
                    "memory": self.kv.memory.kind,  # read by status and tree
                },
            )
        except StoreError as exc:  # a full or read-only store still serves restores
            self._store_failed("recording the fingerprint", exc)
        self.catalog = Catalog(self.store, self.fingerprint, key_id)
        self._pin_reader = PinReader(self.store)  # for explaining partial restores
        self._owns_llm = False
        self._closed = False
        cal = self.store.get_doc(_CALIBRATION_DOC + self.fingerprint.digest) or {}
        self.calibration = Calibration(
            **{k: float(v) for k, v in cal.items() if k in asdict(Calibration())}
        )

    @classmethod
    def open(
        cls,
        model: str | os.PathLike[str] | None = None,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        n_ctx: int = config.DEFAULT_N_CTX,
        n_batch: int = 512,
        n_threads: int | None = None,
        verbose: bool = False,
        namespace: str = "",
        autosave: bool = True,
        prefill_replies: bool = True,
        quota_gb: float | None = None,
        store_key: str | bytes | None = None,
        tool_parser: str | ToolParser | None = None,
        chat_template: str | os.PathLike[str] | None = None,
        chat_format: str | None = None,
        **llama_kwargs: Any,
    ) -> PrefixCache:
        """Load a model (default: the bundled SmolLM2) and open a cache on it.

        Sliding-window models always get ``swa_full=True``: without it llama.cpp drops the KV
        of tokens outside the window and no prefix could be kept (see :mod:`prefixcache.memory`).
        """
        path = config.resolve_model(model)
        llama_kwargs.setdefault("chat_format", chat_format or "chat_template.default")
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_threads=n_threads,
                verbose=verbose,
                **llama_kwargs,
            )
        except ValueError as exc:
            raise PrefixCacheError(f"cannot load model {path}: {exc}") from exc
        try:
            cache = cls(
                llm,
                store,
                namespace=namespace,
                autosave=autosave,
                prefill_replies=prefill_replies,
                quota_gb=quota_gb,
                store_key=store_key,
                tool_parser=tool_parser,
                chat_template=chat_template,
                chat_format=chat_format,
            )
        except BaseException:
            llm.close()
            raise
        if chat_template is not None:  # so that llm.create_chat_completion renders the same
            llm.chat_handler = cache.template._handler
        cache._owns_llm = True
        return cache

    # index ----------------------------------------------------------------------------------

    def root(self, namespace: str | None = None) -> str:
        return self.catalog.root(self.namespace if namespace is None else namespace)

    def check_compatible(self, fingerprint_digest: str) -> None:
        """Raise IncompatibleStateError naming the field in which a stored fingerprint differs."""
        self.catalog.check_compatible(fingerprint_digest)

    def lookup(self, tokens: Sequence[int], namespace: str | None = None) -> Match:
        """The longest stored prefix of ``tokens`` (no model work)."""
        ns = self.namespace if namespace is None else namespace
        with self._lock:
            return self.catalog.sync(ns, tokens).index.match(tokens)

    def explain(
        self,
        messages: Sequence[Message],
        *,
        tools: Tools = None,
        namespace: str | None = None,
        **request: Any,
    ) -> Explanation:
        """Why this request restores what it does: how far it matches each pin and, where it
        leaves the nearest stored prefix, the token position and the text on both sides.

        Takes what :meth:`chat` takes (other request fields are accepted and ignored, so
        ``explain(**openai_request_body)`` works). No model work: the prompt is tokenized and
        looked up; the live KV is not touched.
        """
        return _explain(self, messages, tools, namespace, request)

    # restore --------------------------------------------------------------------------------

    def _restore(
        self, tokens: list[int], namespace: str
    ) -> tuple[int, int, float, Divergence | None]:
        """Make the context hold the longest available prefix of ``tokens``.

        Returns ``(cached, restored, seconds, diverged)``: tokens whose KV is now live, how many
        of them came from the store, the time spent restoring, and where the prompt left a stored
        prefix (if it did). A store that cannot be read, or a segment that cannot be used, only
        shortens what is restored: the rest is prefilled.
        """
        # Live KV left by another tenant is never reused: its speed would tell this tenant
        # what the other one just sent.
        live = 0
        if self.kv.owner == namespace:
            live = common_prefix_length(self.kv.live_tokens(), tokens)
        try:
            known = self.catalog.sync(namespace, tokens)
        except _STORE_FAILURES as exc:
            self._store_failed("reading the index", exc)
            self.kv.truncate(live)
            return self.llm.n_tokens, 0, 0.0, None
        match = known.index.match(tokens)
        # Nothing more than two comparisons unless the prompt leaves a stored prefix.
        diverged = check_restore(
            known,
            match,
            tokens,
            lambda: self.catalog.with_pins(known, self._pin_reader(self.root(namespace))),
            self.template.detokenize,
        )
        if match.length <= live:
            self.kv.truncate(live)
            return self.llm.n_tokens, 0, 0.0, diverged
        t0 = time.perf_counter()
        chain = [known.segments[k] for k in match.chain]
        todo = [s for s in chain if s.end > live]
        self.kv.truncate(todo[0].start)
        restored_bytes = 0
        for seg in self._loader.load(todo, lambda seg, exc: self._load_failed(known, seg, exc)):
            restored_bytes += seg.nbytes
            self._stats.segments_restored += 1
            self._hits.append(seg.key)
        cached = min(match.length, self.llm.n_tokens)
        if cached < match.length:
            diverged = restore_failed(cached, match.length)
        self.kv.truncate(cached)
        cached = self.llm.n_tokens  # memory that cannot be cut there is emptied
        seconds = time.perf_counter() - t0
        restored = max(0, cached - todo[0].start)
        self._stats.bytes_restored += restored_bytes
        self.calibration.observe_restore(restored_bytes, sum(len(s.tokens) for s in todo), seconds)
        return cached, restored, seconds, diverged

    def _load(self, known: Known, seg: Segment) -> bool:
        """Load one segment onto the live KV; False (the KV left as it was) when it cannot be
        (see :meth:`_load_failed`)."""
        return bool(self._loader.load([seg], lambda seg, exc: self._load_failed(known, seg, exc)))

    def _check(self, seg: Segment, buf: memoryview) -> None:
        """Refuse bytes that are not the segment's own (checksum) or not ours (MAC)."""
        if not checksum_matches(buf, seg.checksum):
            raise CorruptSegmentError(seg.key, "checksum mismatch")
        self.integrity.verify(seg, buf)

    def _load_failed(self, known: Known, seg: Segment, exc: Exception) -> None:
        """Deal with a segment that could not be loaded: quarantine only damaged bytes; a
        segment that is intact but that llama.cpp refuses here stays in the store for the
        processes that can use it."""
        if isinstance(exc, CorruptSegmentError):
            try:
                if self.catalog.quarantine(known, seg, exc.reason):
                    self._stats.corrupt_segments += 1
            except _STORE_FAILURES as exc2:
                self._store_failed("quarantining a corrupt segment", exc2)
                self.catalog.refuse(known, seg, exc.reason)
        elif isinstance(exc, (SegmentRefusedError, UnauthenticatedSegmentError)):
            self.catalog.refuse(known, seg, exc.reason)
            self._stats.refused_segments += 1
        else:
            self._store_failed("reading a segment", exc)

    def _record_hits(self) -> None:
        """Record the hits of the segments restored since the last time (LRU bookkeeping)."""
        keys, self._hits = self._hits, []
        now = time.time()
        for key in keys:
            try:
                self.store.touch(key, now)
            except _STORE_FAILURES as exc:
                self._store_failed("recording a hit", exc)

    def _store_failed(self, doing: str, exc: BaseException) -> None:
        """Count a store failure that the call survives; log each kind once."""
        self._stats.store_errors += 1
        kind = (doing, type(exc))
        level = logging.DEBUG if kind in self._reported else logging.WARNING
        self._reported.add(kind)
        log.log(level, "store failure while %s (the call goes on without it): %s", doing, exc)

    def _prepare(
        self, tokens: list[int], namespace: str, extra: int = 1, *, generating: bool = True
    ) -> Prepared:
        """Restore the longest available prefix of ``tokens``, then give back what it takes
        for the suffix to be evaluated as a cold run would (see LlamaKV.suffix_start)."""
        self.kv.validate(tokens, extra)
        if self._hits:  # left by a call that did not record them (prepare(), an error)
            self._record_hits()
        if self.kv.memory.checkpoints:
            prepared = checkpoint.prepare(self, tokens, namespace, generating=generating)
            if not generating:
                self._record_hits()
            return prepared
        cached, restored, seconds, diverged = self._restore(tokens, namespace)
        keep = self.kv.suffix_start(len(tokens), cached, generating=generating)
        if keep < cached:
            self.kv.truncate(keep)
            keep = self.llm.n_tokens  # memory that cannot be cut there is emptied
            restored = max(0, restored - (cached - keep))
            cached = keep
        if generating:
            self.kv.fill_gap(tokens)  # (prefill the call pays for: counted by its caller)
        self.kv.owner = namespace
        # The Llama prefills the rest of the prompt in batches: trust its KV up to the prompt's
        # end (not the generated tokens that follow), except a last token it evaluates alone.
        alone = generating and self.kv.last_token_alone(len(tokens), self.llm.n_tokens)
        self.kv.exact = len(tokens) - 1 if alone else len(tokens)
        if diverged is not None and generating:  # a pin's own restore is no request's miss
            counts = self._stats.partial_restores
            counts[diverged.kind] = counts.get(diverged.kind, 0) + 1
        if not generating:  # no first token waits: record the hits now
            self._record_hits()
        return Prepared(tokens, cached, restored, seconds, diverged)

    def prepare(
        self, messages: Sequence[Message], *, tools: Tools = None, namespace: str | None = None
    ) -> Prepared:
        """Restore the longest stored prefix of this conversation into the Llama.

        A plain ``llm.create_chat_completion(messages)`` afterwards evaluates only the suffix
        (the Llama must use the model's own template: ``chat_format="chat_template.default"``).
        Replies waiting to be prefilled ahead are dropped: the Llama is the caller's now.
        """
        ns = self.namespace if namespace is None else namespace
        with self._lock:
            tokens = self.template.tokens(messages, tools)
            prepared = self._prepare(tokens, ns)
            self._count(prepared)
            self.ahead.started(ns, prepared)
            self.ahead.drop()
            return prepared

    def _count(self, prepared: Prepared) -> None:
        s = self._stats
        s.calls += 1
        s.prompt_tokens += prepared.prompt_tokens
        s.cached_tokens += prepared.reused_tokens
        s.restored_tokens += prepared.restored_tokens
        s.restore_seconds += prepared.restore_seconds
        if prepared.restored_tokens > 0:
            s.hits += 1
        elif prepared.cached_tokens == 0:
            s.misses += 1

    # storing --------------------------------------------------------------------------------

    def _store_span(
        self,
        tokens: list[int],
        end: int,
        namespace: str,
        *,
        label: str,
        boundaries: Sequence[int] | Callable[[], Sequence[int]] = (),
        min_span: int = 1,
        before_write: Callable[[list[str], int], None] | None = None,
    ) -> tuple[str | None, list[str], int]:
        """Store ``tokens[:end]`` (whose KV must be live) as segments chained onto what is stored.

        Returns ``(last key, new keys, new bytes)``; the last key is None when nothing is stored.
        ``before_write`` is given the keys of the whole chain (stored ancestors and new segments)
        and the new bytes, before anything is written. ``boundaries`` may be a function, called
        only when there is something new to store (it may render the conversation).
        """
        if common_prefix_length(self.kv.live_tokens(), tokens[:end]) < end:
            raise RuntimeError("the span to store is not live in the context")
        known = self.catalog.sync(namespace, tokens[:end])
        root = self.root(namespace)
        parent, at = known.index.deepest_boundary(tokens[:end])
        if at == end:
            return parent, [], 0
        matched = known.index.match(tokens[:end]).length
        if callable(boundaries):
            boundaries = boundaries()
        cuts = {b for b in boundaries if at < b < end}
        if matched < end and matched - at >= SPLIT_MIN_TOKENS:
            # The span runs inside an existing segment for a while: store that shared head on
            # its own so that both branches chain from it instead of duplicating it again.
            cuts.add(matched)
        elif end - at < min_span:
            return parent, [], 0
        step = self.segment_tokens
        cuts.update(range((at // step + 1) * step, end, step))
        if self.kv.memory.checkpoints:  # a recurrent state exists only where it was snapshotted
            taken = self.kv.checkpoint_cuts(at, end)
            if taken is None:
                return parent, [], 0
            cuts = set(taken)
        edges = [at, *sorted(cuts), end]
        captured = []
        for a, b in itertools.pairwise(edges):
            captured.append((a, b, self.kv.capture(a, b)))
        now = time.time()
        segs: list[tuple[Segment, bytearray]] = []
        p = parent or root
        for a, b, data in captured:
            span = tuple(tokens[a:b])
            key = segment_key(p, span)
            seg = Segment(
                key=key,
                parent=p,
                root=root,
                start=a,
                tokens=span,
                nbytes=len(data),
                checksum=checksum(data),
                fingerprint=self.fingerprint.digest,
                namespace=namespace,
                created=now,
                label=label,
            )
            segs.append((self.integrity.sign(seg, data), data))
            p = key
        new_keys = [s.key for s, _ in segs]
        new_bytes = sum(s.nbytes for s, _ in segs)
        if before_write is not None:
            ancestors = list(known.index.chain(parent)) if parent is not None else []
            before_write(ancestors + new_keys, new_bytes)
        gen_before = self.store.generation()
        written = 0
        for seg, data in segs:
            if self.store.put(seg, data):
                written += 1
                self._stats.segments_saved += 1
                self._stats.bytes_saved += seg.nbytes
            self.catalog.add(known, seg)
        self.catalog.wrote(gen_before, written)
        return p, new_keys, new_bytes

    def _evict(self, protect: Sequence[str] = ()) -> Eviction:
        return enforce_quota(self.store, self.quota_bytes, time.time(), protect)

    def _after_store(self, protect: Sequence[str] = ()) -> None:
        """Enforce the quota and keep the calibration: bookkeeping that never fails a call."""
        try:
            # The new segments are the most recent, so LRU evicts them last; under a quota too
            # small for them they go too, which is what a quota means.
            self._evict(protect)
            self._save_calibration()
        except Exception as exc:  # diskcache's lock Timeout is no OSError
            self._store_failed("enforcing the quota", exc)

    # pins -----------------------------------------------------------------------------------

    def message_boundaries(self, messages: Sequence[Message], tools: Tools = None) -> list[int]:
        """Token positions where each leading run of messages ends (stable boundaries only)."""
        out = []
        for i in range(1, len(messages)):
            try:
                out.append(len(self.template.prefix_tokens(messages[:i], tools)))
            except TemplateError:
                continue
        return out

    def pin(
        self,
        messages: Sequence[Message],
        name: str,
        *,
        tools: Tools = None,
        ttl: float | None = None,
        namespace: str | None = None,
        progress: Progress | None = None,
        source: str = "",
        digest: str = "",
        prefix_tokens: list[int] | None = None,
    ) -> PinInfo:
        """Prefill ``messages`` once, store their KV and pin it under ``name``.

        Pinned segments are never evicted (until ``ttl`` seconds have passed, if given). Pinning
        what is already stored evaluates nothing. Raises QuotaExceededError when the pinned
        total would exceed the quota, and PromptTooLongError when the prefix does not fit.
        """
        ns = self.namespace if namespace is None else namespace
        tokens = (
            prefix_tokens
            if prefix_tokens is not None
            else self.template.prefix_tokens(messages, tools)
        )
        boundaries = self.message_boundaries(messages, tools)
        root = self.root(ns)
        with self._lock, self.store.lock(f"pin:{root}:{name}"):
            prepared = self._prepare(tokens, ns, generating=False)
            self._count(prepared)
            todo = tokens[prepared.cached_tokens :]
            t0 = time.perf_counter()
            self.kv.evaluate(todo, progress, stops=boundaries)
            self._note_prefill(len(todo), time.perf_counter() - t0)
            now = time.time()

            def quota_check(keys: list[str], nbytes: int) -> None:
                check_pin_quota(self.store, self.quota_bytes, keys, nbytes, now)

            # Stored and pinned under the eviction lock: an evictor (any process) would
            # otherwise take the new, not yet pinned segments, or the stored ancestors they
            # chain onto, before the pin names them, and the pin would dangle.
            with self.store.lock("evict", timeout=EVICTION_LOCK_TIMEOUT_S):
                last, new_keys, new_bytes = self._store_span(
                    tokens,
                    len(tokens),
                    ns,
                    label=name,
                    boundaries=boundaries,
                    before_write=quota_check,
                )
                if last is None:
                    raise PrefixCacheError("nothing to pin: the prefix is empty")
                if not new_keys:
                    quota_check(list(self.catalog.sync(ns, tokens).index.chain(last)), 0)
                self.store.set_pin(
                    Pin(
                        name=name,
                        key=last,
                        root=root,
                        n_tokens=len(tokens),
                        created=now,
                        expires=None if ttl is None else now + ttl,
                        source=source,
                        digest=digest,
                    )
                )
            self._pin_reader.clear()
            self._after_store(protect=[last])
            return PinInfo(name, last, len(tokens), len(todo), len(new_keys), new_bytes)

    def unpin(self, name: str, *, namespace: str | None = None) -> bool:
        """Drop a pin; its segments become ordinary LRU entries. False if there was none."""
        found = self.store.delete_pin(self.root(namespace), name)
        self._pin_reader.clear()
        return found

    def pins(self, namespace: str | None = None) -> list[Pin]:
        root = self.root(namespace)
        return [p for p in self.store.pins() if p.root == root]

    # generation -----------------------------------------------------------------------------

    def _note_prefill(self, tokens: int, seconds: float) -> None:
        self._stats.prefill_tokens += tokens
        self._stats.prefill_seconds += seconds
        self.calibration.observe_prefill(tokens, seconds)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Tools = None,
        stream: bool = False,
        namespace: str | None = None,
        autosave: bool | None = None,
        tool_parser: str | ToolParser | None = None,
        prefill_replies: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """An OpenAI-shaped chat completion that starts from the longest stored prefix.

        Takes what OpenAI's chat-completions API takes (checked by
        :func:`prefixcache.request.normalise_chat`: content-part lists, the developer role,
        ``max_completion_tokens``; a malformed request raises ``RequestError``) and
        ``create_chat_completion``'s other keyword arguments. The model's tool calls come back
        as ``message.tool_calls`` with ``finish_reason="tool_calls"``, read by ``tool_parser``
        (default: the one chosen from the chat template). ``tool_choice="required"`` or a named
        function, and ``response_format`` json_object/json_schema, are enforced by a grammar.
        ``usage`` gains ``prompt_tokens_details.cached_tokens``. With ``stream=True`` an
        iterator of chunks is returned (tool calls as ``delta.tool_calls``); pass
        ``stream_options={"include_usage": True}`` for a final usage chunk.

        ``prefill_replies`` (None: the cache's ``prefill_replies``, True unless opened
        otherwise): once the reply is made (a stream: read to its end), prefill the
        next turn's prefix, this conversation with the reply, in the background while the
        model is idle, so that the next turn prefills only its new messages (see
        :meth:`prefill_ahead`). The Llama is then busy until :meth:`idle`: use it through this
        cache (or :meth:`prepare`), not directly, and read no logits it left before that.
        """
        return generate.chat(
            self,
            messages,
            tools=tools,
            stream=stream,
            namespace=namespace,
            autosave=autosave,
            tool_parser=tool_parser,
            prefill_replies=self.prefill_replies if prefill_replies is None else prefill_replies,
            kwargs=kwargs,
        )

    def prefill_ahead(
        self,
        messages: Sequence[Message],
        reply: Message,
        *,
        tools: Tools = None,
        namespace: str | None = None,
    ) -> int:
        """Prefill in the background what the next turn's prompt begins with: ``messages``, the
        assistant's ``reply`` and the tokens up to where the next message starts, whatever it is.

        ``chat()`` does this itself after each reply (``prefill_replies``). The work is done
        while the model is idle, gives the model back between micro-batches as soon as a call
        wants it (keeping what it did), and its KV is what a cold run computes; it is stored as
        autosave stores a prompt. Returns the prefix's length in tokens at once; :meth:`idle`
        waits for the work. Raises TemplateError when the template leaves no stable boundary
        after the reply.
        """
        ns = self.namespace if namespace is None else namespace
        prefix = self.template.prefix_tokens([*messages, reply], tools)
        prompt = self.template.tokens(messages, tools)
        self.ahead.schedule(messages, reply, tools, ns, prompt, save=self.autosave, tokens=prefix)
        return len(prefix)

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until no reply is being prefilled ahead or waiting to be; False on timeout."""
        return self.ahead.idle(timeout)

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        stream: bool = False,
        namespace: str | None = None,
        autosave: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """An OpenAI-shaped text completion of a raw prompt (text or token ids).

        The prompt is tokenized as ``Llama.create_completion`` does (see :meth:`tokenize_prompt`)
        and matched against the store like a chat; takes ``create_completion``'s keyword
        arguments and returns its dict (or chunks), with ``usage`` as in :meth:`chat`.
        """
        return generate.complete(
            self, prompt, stream=stream, namespace=namespace, autosave=autosave, kwargs=kwargs
        )

    def tokenize_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """The token ids ``Llama.create_completion`` evaluates for ``prompt`` (no infill suffix).

        Text gets the model's BOS (or CLS) and, for models that ask for one, EOS (or SEP), and its
        special tokens are parsed, as llama-cpp-python does; token ids are taken as they are.
        """
        if not isinstance(prompt, str):
            tokens = [int(t) for t in prompt]
            if not tokens:
                raise PrefixCacheError("the prompt is empty")
            return tokens
        model = self.llm._model
        bos = model.token_cls() if model.token_cls() != -1 else model.token_bos()
        sep = model.token_sep()
        head = [bos] if model.add_bos_token() and bos != -1 else []
        eos = sep if sep != -1 else model.token_eos()
        tail = [eos] if model.add_eos_token() or sep != -1 else []
        body = self.template.tokenize(prompt) if prompt else []
        tokens = head + body + tail
        if not tokens:
            raise PrefixCacheError("the prompt is empty")
        return tokens

    def _autosave(
        self, ns: str, prepared: Prepared, cut: Callable[[], int | None] | None = None
    ) -> None:
        """Store the prompt of the call just made, so the next turn restores all of it.

        The reply is not stored: tokens decoded one at a time have KV that differs in the last
        bits from a batched prefill, and restoring it would make the next turn's output differ
        from a cold run. The next turn prefills the reply with its new message, and its own
        autosave then stores both. Storing is an optimisation: the answer is already made, so a
        failure here (a full disk, a store that is down, a lock timeout) is logged and counted
        in ``stats()["store_errors"]``, never raised.

        ``cut``: a function giving where the prompt's last message begins (it renders the
        conversation, so it is called only when something new is stored). A segment ends there,
        so the next call that shares everything before it but asks something else (another
        question on the same system prompt) chains from that segment instead of storing a second
        copy of it.
        """
        end = common_prefix_length(self.kv.live_tokens(), prepared.tokens)
        if end <= 0:
            return
        try:
            self._store_span(
                prepared.tokens,
                end,
                ns,
                label="autosave",
                boundaries=() if cut is None else lambda: _boundary(cut()),
                min_span=self.calibration.min_span_tokens(),
            )
        except Exception as exc:  # see the docstring
            self._store_failed("autosaving", exc)
            return
        self._after_store()

    # reporting ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since open, plus the prefill time the restored tokens saved."""
        s = asdict(self._stats)
        rate = self.calibration.prefill_tokens_per_s
        saved = self._stats.restored_tokens / rate - self._stats.restore_seconds if rate else 0.0
        s["time_saved_s"] = max(0.0, saved)
        s["prefill_tokens_per_s"] = rate
        s["restore_bytes_per_s"] = self.calibration.restore_bytes_per_s
        s.update(self.ahead.stats())
        return s

    def _save_calibration(self) -> None:
        self.store.set_doc(_CALIBRATION_DOC + self.fingerprint.digest, asdict(self.calibration))

    def calibrate(self, n_tokens: int = 256) -> Calibration:
        """Measure prefill rate and restore throughput now (used by the cost model and status)."""
        with self._lock:
            n_tokens = min(n_tokens, self.segment_tokens)  # one segment, restorable whole
            filler = self.template.tokenize("calibration " * n_tokens)[:n_tokens]
            self.kv.truncate(0)
            t0 = time.perf_counter()
            self.kv.evaluate(filler)
            self.calibration.prefill_tokens_per_s = len(filler) / (time.perf_counter() - t0)
            data = self.kv.capture(0, len(filler))
            buf = self.kv.buffer(len(data))
            buf[:] = data
            times = []
            for _ in range(5):
                self.kv.truncate(0)
                t0 = time.perf_counter()
                ok = checksum(buf)
                self.kv.restore(buf, len(data), 0, filler)
                times.append(time.perf_counter() - t0)
                del ok
            best = sorted(times)[len(times) // 2]
            self.calibration.restore_bytes_per_s = len(data) / best
            self.calibration.bytes_per_token = len(data) / len(filler)
            self.kv.truncate(0)
            self._save_calibration()
            return self.calibration

    def close(self) -> None:
        """Save the calibration, close the store and, if :meth:`open` loaded it, the model."""
        self.ahead.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._record_hits()
                self._save_calibration()
            except Exception as exc:  # closing must not fail on bookkeeping
                self._store_failed("saving the calibration", exc)
            self._loader.close()
            self.store.close()
            if self._owns_llm:
                self.llm.close()

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PinInfo", "PrefixCache", "Prepared", "Stats", "as_tokens"]


def _boundary(at: int | None) -> tuple[int, ...]:
    return () if at is None else (at,)
