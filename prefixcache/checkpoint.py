"""Restoring checkpointed memory: recurrent and hybrid models (see :mod:`prefixcache.memory`).

Each stored segment of such a model holds the whole sequence state at its end, so a prompt is
restored from the deepest segment that ends inside it, exactly at that segment's end (never by
cutting a state short). The prompt's rest is then evaluated here, not by llama-cpp-python: its
prefix reuse cuts memory with ``seq_rm`` on all sequences, which recurrent memory refuses, and it
would start over. With the whole prompt evaluated and its logits live, llama-cpp-python samples
at once; the state after the prompt is snapshotted on the way, for autosave to store.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .radix import common_prefix_length

if TYPE_CHECKING:
    from .cache import PrefixCache, Prepared


def prepare(cache: PrefixCache, tokens: list[int], namespace: str, *, generating: bool) -> Prepared:
    """Make the context hold the state after the longest checkpointed prefix of ``tokens``
    (then, when ``generating``, after all of them, with the last token's logits live)."""
    from .cache import _STORE_FAILURES, Prepared

    kv = cache.kv
    llm = cache.llm
    n = len(tokens)
    # A cold run evaluates the last prompt token alone when it starts a micro-batch: so must we.
    alone = generating and (n - 1) % kv.unit == 0

    def fits(c: int) -> bool:
        """Whether the rest after ``c`` tokens evaluates as a cold run's (no extra batch of
        one token) and, when generating, leaves at least one token to give the logits."""
        s = n - c
        if generating:
            return s == 1 or s >= 3 if alone else s >= 2
        return s == 0 or s >= 2

    live = 0
    if kv.owner == namespace and llm.n_tokens == kv.exact:
        common = common_prefix_length(kv.live_tokens(), tokens)
        if common == llm.n_tokens and fits(common):
            live = common
    t0 = time.perf_counter()
    restored = 0
    nbytes = 0
    try:
        known = cache.catalog.sync(namespace, tokens)
        match = known.index.match(tokens)
        chain = [known.segments[k] for k in match.chain]
    except _STORE_FAILURES as exc:
        cache._store_failed("reading the index", exc)
        chain = []
        match = None
    pick = None
    if match is not None:
        for i in reversed(range(len(chain))):
            if chain[i].end <= live:
                break
            if chain[i].end <= match.length and fits(chain[i].end):
                pick = i
                break
    base = live
    if pick is not None:
        if kv.memory.ranges:
            # Segments hold their span's attention KV: load the chain in order, from the live
            # state if it ends on one of its segments, else from the start.
            first = next((i + 1 for i in range(pick) if chain[i].end == live), 0)
            base = live if first else 0
            todo = chain[first : pick + 1]
        else:
            base = 0
            todo = [chain[pick]]
        kv.truncate(base)
        done = base
        for seg in todo:
            if not cache._load(known, seg):
                break
            llm.input_ids[: seg.start] = tokens[: seg.start]
            done = seg.end
            nbytes += seg.nbytes
            cache._stats.segments_restored += 1
            cache._hits.append(seg.key)  # recorded after the call (PrefixCache._record_hits)
        if done > base and not fits(done):  # a chain cut short where the rest cannot follow
            done = 0
        restored = done - base if done > base else 0
        live = done if done > base else (base if llm.n_tokens == base else 0)
    kv.truncate(live)
    cached = llm.n_tokens
    seconds = time.perf_counter() - t0
    if restored:
        cache._stats.bytes_restored += nbytes
        cache.calibration.observe_restore(nbytes, restored, seconds)
    kv.owner = namespace
    if generating:
        kv.evaluate(tokens[cached:], last_alone=alone)
    return Prepared(tokens, cached, restored, seconds)


__all__ = ["prepare"]
