# ruff: noqa: RUF001 (the table uses the multiplication sign on purpose)
"""Replies prefilled ahead: the next turn's time to first token after a long reply.

Run: ``nice -n 10 .venv/bin/python bench/reply_prefill.py [--lengths 30 200 800]
[--tool-times 0 1 5] [--results bench/results.md]``

A coding agent's step: the model writes a reply of about 30, 200 or 800 tokens (a patch; end of
turn banned until then, so every method gets the same reply), the agent runs its tool for the
simulated tool time, and sends the next turn: the conversation, the reply and the tool's output.
Measured on that next turn: time to first token, and the prompt tokens prefilled on its critical
path. Methods: a cold run (every token prefilled), llama-cpp-python with a LlamaRAMCache (reuses
the decoded reply's KV: not exact), prefixcache without reply prefill (``prefill_replies=False``:
restores the previous prompt, prefills the reply again), and prefixcache prefilling the reply in
the background during the tool time (the default). The next turn's 16 greedy tokens are compared
with the cold run's. Each store lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
from _common import count_evals, load_llm
from llama_cpp.llama_cache import LlamaRAMCache

from prefixcache import PrefixCache
from prefixcache.template import ChatTemplate

N_CTX = 4096
NEXT_TOKENS = 16
SYSTEM = {
    "role": "system",
    "content": (
        "You are a coding agent working on a Python repository. You write patches as unified "
        "diffs, then the agent applies them and runs the test suite with the run_tests tool and "
        "shows you its output. Keep the code typed, documented and covered by tests."
    ),
}
TASK = {
    "role": "user",
    "content": "Add a function parse_duration(text) to utils.py that turns '1h30m' into "
    "seconds, with tests. Reply with the patch.",
}
TOOL_OUTPUT = {
    "role": "user",
    "content": "run_tests output: 14 passed, 1 failed: test_parse_duration_empty "
    "(ValueError not raised for ''). Fix the failing test.",
}
MARKER = "<!-- reply_prefill: written by bench/reply_prefill.py -->"


def ended_only_at(llm: llama_cpp.Llama) -> dict[int, float]:
    """A logit bias that keeps the model from ending its turn (so replies have the asked length)."""
    specials = {llm.token_eos(), *llm.tokenize(b"<|im_end|><|im_start|>", False, True)}
    return {t: -100.0 for t in specials if t >= 0}


def foreign_cores() -> Callable[[], float]:
    """Cores used by other processes from now until the returned function is called."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle
    mine = sum(os.times()[:4])
    wall = time.perf_counter()

    def since() -> float:
        t2 = psutil.cpu_times()
        other = (sum(t2) - t2.idle - busy) - (sum(os.times()[:4]) - mine)
        return max(0.0, other) / max(1e-9, time.perf_counter() - wall)

    return since


def timed_stream(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Seconds to the first content chunk, the text, and the usage chunk (if any)."""
    t0 = time.perf_counter()
    ttft = None
    text = ""
    usage: dict[str, Any] = {}
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                text += piece
    return {"ttft_s": ttft or time.perf_counter() - t0, "text": text, "usage": usage}


class Plain:
    """llama-cpp-python's own chat calls: cold (reset before each) or with a LlamaRAMCache."""

    def __init__(self, ram: bool):
        self.llm = load_llm(n_ctx=N_CTX)
        self.ram = ram
        if ram:
            self.llm.set_cache(LlamaRAMCache())
        self.evals = count_evals(self.llm)
        self.template = ChatTemplate(self.llm)

    def reply(self, messages: list[dict[str, Any]], length: int) -> dict[str, Any]:
        if not self.ram:
            self.llm.reset()
        out = self.llm.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            max_tokens=length,
            temperature=0,
            logit_bias=ended_only_at(self.llm),
        )
        return dict(out["choices"][0]["message"])  # type: ignore[index]

    def next_turn(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.ram:
            self.llm.reset()
        self.evals.clear()
        chunks = self.llm.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            max_tokens=NEXT_TOKENS,
            temperature=0,
            stream=True,
        )
        out = timed_stream(chunks)  # type: ignore[arg-type]
        prompt = len(self.template.tokens(messages))
        return {**out, "prompt": prompt, "prefilled": self.evals[0] if self.evals else 0}


def prefixcache_turns(
    llm: llama_cpp.Llama, store: Path, length: int, tool_s: float, prefill: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn one, the tool time, then the next turn, on a fresh store; (next turn, stats)."""
    llm.reset()  # nothing live from the previous run
    cache = PrefixCache(llm, store)
    try:
        first = [SYSTEM, TASK]
        out = cache.chat(
            first,
            max_tokens=length,
            temperature=0,
            logit_bias=ended_only_at(llm),
            prefill_replies=prefill,
        )
        reply = out["choices"][0]["message"]
        time.sleep(tool_s)  # the agent runs its tool
        ahead = cache.stats()
        messages = [*first, reply, TOOL_OUTPUT]
        result = timed_stream(
            cache.chat(
                messages,
                max_tokens=NEXT_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                prefill_replies=False,
            )
        )
        usage = result["usage"]
        result["prompt"] = usage["prompt_tokens"]
        result["prefilled"] = (
            usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        )
        result["reply_tokens"] = out["usage"]["completion_tokens"]
        result["reply"] = reply
        return result, ahead
    finally:
        cache.close()


def run(lengths: list[int], tool_times: list[float]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cold, ram = Plain(ram=False), Plain(ram=True)
    pc_llm = PrefixCache.open(store=tempfile.mkdtemp(prefix="pc-warmup-"), n_ctx=N_CTX).llm
    with tempfile.TemporaryDirectory(prefix="reply-prefill-") as tmp:
        for length in lengths:
            first = [SYSTEM, TASK]
            reply = cold.reply(first, length)
            messages = [*first, reply, TOOL_OUTPUT]
            # The next turn's new tokens: what follows the boundary after the reply.
            new = len(cold.template.tokens(messages)) - len(
                cold.template.prefix_tokens([*first, reply])
            )
            load = foreign_cores()
            ref = cold.next_turn(messages)
            rows.append(_row(length, None, "cold", ref, ref, load()))
            print(_line(rows[-1]), flush=True)
            load = foreign_cores()
            ram.llm.reset()
            ram_reply = ram.reply(first, length)
            got = ram.next_turn([*first, ram_reply, TOOL_OUTPUT])
            rows.append(_row(length, None, "LlamaRAMCache", got, ref, load()))
            print(_line(rows[-1]), flush=True)
            for prefill, times in ((False, [0.0]), (True, tool_times)):
                for tool_s in times:
                    store = Path(tmp) / f"{length}-{prefill}-{tool_s}"
                    load = foreign_cores()
                    got, ahead = prefixcache_turns(pc_llm, store, length, tool_s, prefill)
                    if got["reply"].get("content") != reply.get("content"):
                        print("   (prefixcache's reply differs from the cold run's)")
                    method = "prefixcache, reply prefill" if prefill else "prefixcache, off"
                    row = _row(length, tool_s if prefill else None, method, got, ref, load())
                    row["ahead_tokens"] = ahead["reply_prefill_tokens"]
                    row["ahead_s"] = ahead["reply_prefill_seconds"]
                    rows.append(row)
                    print(_line(row), flush=True)
            for row in rows:
                row.setdefault("new", new)
    pc_llm.close()
    return rows


def _row(
    length: int,
    tool_s: float | None,
    method: str,
    got: dict[str, Any],
    ref: dict[str, Any],
    load: float,
) -> dict[str, Any]:
    return {
        "length": length,
        "tool_s": tool_s,
        "method": method,
        "prompt": got["prompt"],
        "prefilled": got["prefilled"],
        "ttft_s": got["ttft_s"],
        "same": got["text"] == ref["text"],
        "load": load,
    }


def _line(row: dict[str, Any]) -> str:
    tool = "any" if row["tool_s"] is None else f"{row['tool_s']:g} s"
    return (
        f"  reply ~{row['length']:>4}  tool {tool:>5}  {row['method']:<28}"
        f" prompt {row['prompt']:>5}"
        f"  prefilled {row['prefilled']:>5}  TTFT {row['ttft_s'] * 1000:8.1f} ms"
        f"  {'same' if row['same'] else 'DIFFERS'}  (other load {row['load']:.2f} cores)"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "reply tokens",
        "tool time",
        "method",
        "next-turn prompt (new)",
        "prefilled on the critical path",
        "TTFT",
        "vs cold",
        "= cold output",
        "reply tokens prefilled ahead when the next turn was sent",
        "other load (cores)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cold = {r["length"]: r["ttft_s"] for r in rows if r["method"] == "cold"}
    for r in rows:
        ahead = f"{r['ahead_tokens']} tokens in {r['ahead_s']:.2f} s" if "ahead_tokens" in r else ""
        if r["method"] == "prefixcache, off":
            ahead = "—"
        cells = [
            f"~{r['length']}",
            "any" if r["tool_s"] is None else f"{r['tool_s']:g} s",
            r["method"],
            f"{r['prompt']} ({r['new']})",
            str(r["prefilled"]),
            f"{r['ttft_s'] * 1000:.0f} ms",
            f"{cold[r['length']] / r['ttft_s']:.1f}×",
            "✓" if r["same"] else "✗",
            ahead,
            f"{r['load']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(rows: list[dict[str, Any]], command: str) -> str:
    pc = [r for r in rows if r["method"] == "prefixcache, reply prefill" and r["tool_s"]]
    only_new = sum(1 for r in pc if r["prefilled"] <= r["new"] + 1)
    medians = statistics.median(r["load"] for r in rows) if rows else 0.0
    return "\n".join(
        [
            MARKER,
            "## Replies prefilled ahead: the next turn after a long reply",
            "",
            f"Command: `{command}` (one run per cell; SmolLM2-135M Q4_1, n_ctx {N_CTX}, "
            f"n_batch 512). The model writes a reply of the given length (a patch; its end "
            "of turn is banned until then, so every method gets the same reply), the agent "
            "runs its tool for the tool time, and the next turn sends the tool's output. "
            "'prefilled on the critical path': prompt tokens the next turn evaluates. "
            "LlamaRAMCache reuses the decoded reply's KV (not a batched prefill's); prefixcache "
            "'off' restores the previous prompt and prefills the reply again; 'reply prefill' "
            "(the default) prefills it in the background during the tool time, and a request "
            "that comes first takes the model back within one micro-batch (512 tokens), keeping "
            "what was done. TTFT is wall time on a shared 2-core machine (median other load "
            f"{medians:.2f} cores): the token counts are the stable measure. Where the tool "
            "time is shorter than the reply's prefill, the micro-batch in flight when the "
            "next turn is sent is finished first (the next turn waits for it, but those are "
            "tokens it would have prefilled itself) and the rest is left to the next turn.",
            "",
            table(rows),
            "",
            f"Prefixcache with reply prefill and a tool time: {len(pc)} cells; in "
            f"{only_new} of them the next turn prefilled only its new message (the tool output, "
            "'new': the tokens after the boundary that follows the reply; one more where a "
            "cold run's batches make it give one back).",
            "<!-- /reply_prefill -->",
        ]
    )


def write(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    end = "<!-- /reply_prefill -->"
    pattern = re.compile(re.escape(MARKER) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
    path.write_text(new.rstrip() + "\n")


def main(argv: Iterator[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[30, 200, 800])
    parser.add_argument("--tool-times", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--results", type=Path, default=None, help="write the section here")
    args = parser.parse_args(None if argv is None else list(argv))
    rows = run(args.lengths, args.tool_times)
    command = "nice -n 10 .venv/bin/python bench/reply_prefill.py"
    text = section(rows, command)
    print("\n" + text)
    if args.results is not None:
        write(args.results, text)


if __name__ == "__main__":
    main()
