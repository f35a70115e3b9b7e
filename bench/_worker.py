"""One fresh-process measurement for bench/run.py: load the model, serve requests, print JSON.

Run by run.py only: ``python bench/_worker.py METHOD --prompt FILE [--questions 1 2] [--dir D]``.
Methods: ``cold``, ``disk-populate``, ``disk``, ``ram``, ``pc-populate``, ``pc``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from typing import Any

import llama_cpp
from _common import (
    MAX_TOKENS,
    N_CTX,
    QUESTIONS,
    UNRELATED,
    conversation,
    count_evals,
    emit,
    load_llm,
    max_rss_bytes,
    stream_timing,
)
from llama_cpp.llama_cache import LlamaDiskCache, LlamaRAMCache

from prefixcache import PrefixCache
from prefixcache.restore import segment_bytes
from prefixcache.segment import checksum


def run_plain(method: str, system: list[dict[str, str]], questions: list[int], d: str) -> Any:
    t0 = time.perf_counter()
    llm = load_llm()
    cache = None
    if method.startswith("disk"):
        cache = LlamaDiskCache(cache_dir=d)
    elif method == "ram":
        cache = LlamaRAMCache()
    if cache is not None:
        llm.set_cache(cache)
    load_s = time.perf_counter() - t0
    calls = count_evals(llm)
    out: dict[str, Any] = {"load_s": load_s, "rss_after_load": max_rss_bytes(), "runs": []}
    if method == "ram":
        # Same process: the first request fills the RAM cache; before each timed request an
        # unrelated one takes the context over, so the prefix must come back from the cache.
        t = time.perf_counter()
        llm.create_chat_completion(
            messages=conversation(system, QUESTIONS[0]), max_tokens=MAX_TOKENS, temperature=0
        )
        out["populate_s"] = time.perf_counter() - t
    for q in questions:
        if method == "ram":
            llm.create_chat_completion(messages=UNRELATED, max_tokens=1, temperature=0)
        elif method == "cold":
            llm.reset()
        calls.clear()
        run = stream_timing(
            lambda q=q: llm.create_chat_completion(
                messages=conversation(system, QUESTIONS[q]),
                stream=True,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
        )
        run["question"] = q
        run["prefill_tokens"] = calls[0] if calls else 0
        run["max_rss"] = max_rss_bytes()
        out["runs"].append(run)
    return out


def run_pc(method: str, system: list[dict[str, str]], questions: list[int], d: str) -> Any:
    t0 = time.perf_counter()
    cache = PrefixCache.open(store=d, n_ctx=N_CTX)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"load_s": load_s, "rss_after_load": max_rss_bytes(), "runs": []}
    if method == "pc-populate":
        t = time.perf_counter()
        info = cache.pin(system, name="bench")
        out["populate_s"] = time.perf_counter() - t
        out["pinned_tokens"] = info.n_tokens
        cache.close()
        return out
    llm = cache.llm
    for q in questions:
        messages = conversation(system, QUESTIONS[q])
        before = cache.stats()
        cache.kv.truncate(0)  # one request per process normally; later ones start empty too
        run = stream_timing(
            lambda m=messages: cache.chat(m, stream=True, max_tokens=MAX_TOKENS, temperature=0)
        )
        after = cache.stats()
        run["question"] = q
        run["max_rss"] = max_rss_bytes()
        run["restored_tokens"] = after["restored_tokens"] - before["restored_tokens"]
        run["restore_s"] = after["restore_seconds"] - before["restore_seconds"]
        run["bytes_restored"] = after["bytes_restored"] - before["bytes_restored"]
        run["prompt_tokens"] = after["prompt_tokens"] - before["prompt_tokens"]
        run["prefill_tokens"] = run["prompt_tokens"] - (
            after["cached_tokens"] - before["cached_tokens"]
        )
        out["runs"].append(run)
    # Restore throughput as prepare() does it (store read + checksum + set_data), then the raw
    # floor: one bare llama_state_seq_set_data of the same prefix's bytes, already in memory.
    messages = conversation(system, QUESTIONS[questions[0]])
    prompt = cache.template.tokens(messages)
    restores = []
    for _ in range(5):
        cache.kv.truncate(0)
        b0 = cache.stats()["bytes_restored"]
        p = cache.prepare(messages)
        restores.append(
            (p.restore_seconds, cache.stats()["bytes_restored"] - b0, p.restored_tokens)
        )
    # Where prepare()'s restore time goes: the same steps as PrefixCache._load, one at a time.
    known = cache.catalog.sync(cache.namespace, prompt)
    chain = [known.segments[k] for k in known.index.match(prompt).chain]
    parts = {"read": [], "checksum": [], "set_data": [], "touch": []}
    for _ in range(5):
        cache.kv.truncate(0)
        acc = dict.fromkeys(parts, 0.0)
        for seg in chain:
            t = time.perf_counter()
            with segment_bytes(cache.store, cache.kv, seg) as buf:  # mapped: no copy
                acc["read"] += time.perf_counter() - t
                t = time.perf_counter()
                assert checksum(buf) == seg.checksum
                acc["checksum"] += time.perf_counter() - t
                t = time.perf_counter()
                cache.kv.restore(buf, seg.nbytes, seg.start, seg.tokens)
                acc["set_data"] += time.perf_counter() - t
            t = time.perf_counter()
            cache.store.touch(seg.key, time.time())
            acc["touch"] += time.perf_counter() - t
        for k, v in acc.items():
            parts[k].append(v)
    out["restore_parts"] = {k: statistics.median(v) for k, v in parts.items()}
    out["prepare_restore_s"] = statistics.median(r[0] for r in restores)
    out["prepare_restore_bytes"] = restores[0][1]
    out["prepare_restore_tokens"] = restores[0][2]
    # The floor restores the pinned prefix and evaluates the rest of the prompt (the question).
    n_prefix = max(p.n_tokens for p in cache.pins())
    out["prefix_tokens"] = n_prefix
    data = cache.kv.capture(0, n_prefix)
    nbytes = len(data)
    buf = (ctypes.c_uint8 * nbytes).from_buffer(data)
    ctx = llm._ctx.ctx
    mem = llama_cpp.llama_get_memory(ctx)
    sets, evals = [], []
    for _ in range(5):
        cache.kv.truncate(0)
        llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
        t = time.perf_counter()
        loaded = llama_cpp.llama_state_seq_set_data(ctx, buf, nbytes, 0)
        sets.append(time.perf_counter() - t)
        assert loaded == nbytes, (loaded, nbytes)
        llm.input_ids[:n_prefix] = prompt[:n_prefix]
        llm.n_tokens = n_prefix
        t = time.perf_counter()
        llm.eval(prompt[n_prefix:])
        evals.append(time.perf_counter() - t)
    del buf
    out["raw_set_bytes"] = nbytes
    out["raw_set_s"] = statistics.median(sets)
    out["suffix_eval_s"] = statistics.median(evals)
    out["suffix_tokens"] = len(prompt) - n_prefix
    cache.kv.truncate(0)
    cache.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--prompt", required=True, help="JSON file with the system messages")
    parser.add_argument("--questions", type=int, nargs="*", default=[])
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    with open(args.prompt) as f:
        system = json.load(f)
    questions = args.questions
    if args.method.endswith("-populate"):
        questions = [0]
    if args.method.startswith("pc"):
        result = run_pc(args.method, system, questions, args.dir)
    else:
        result = run_plain(args.method, system, questions, args.dir)
    result["max_rss"] = max_rss_bytes()
    emit(result)


if __name__ == "__main__":
    main()
