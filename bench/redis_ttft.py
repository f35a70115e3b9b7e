"""Time to first token of a second worker that restores a pinned prefix from Redis.

One worker pins a long system prompt through a Redis store; then, several times, a fresh worker
process with an EMPTY local tier asks a question under that prompt (restoring the prefix from
Redis), and a fresh plain llama-cpp-python process asks the same question cold (full prefill).
Prints the medians and their ratio. Starts and stops its own redis-server.

    .venv/bin/python bench/redis_ttft.py [--runs 5] [--tokens 1500] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

N_CTX = 4096
QUESTION = "In one sentence: which policy covers late deliveries?"


def system_prompt(n_tokens: int) -> dict[str, str]:
    """A long, deterministic system prompt of roughly ``n_tokens`` tokens."""
    lines = ["You are the support assistant of Bolt & Board. Follow these policies exactly."]
    i = 0
    while len(" ".join(lines)) < n_tokens * 4:
        i += 1
        lines.append(
            f"Policy {i}: orders of category {i % 7} ship within {i % 5 + 1} days; refunds for "
            f"category {i % 7} take {i % 3 + 2} days; ask for order number and email first."
        )
    return {"role": "system", "content": "\n".join(lines)}


def messages(n_tokens: int) -> list[Any]:
    return [system_prompt(n_tokens), {"role": "user", "content": QUESTION}]


def first_token_seconds(chunks: Any) -> tuple[float, str]:
    t0 = time.perf_counter()
    text = ""
    first = 0.0
    for chunk in chunks:
        delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
        if delta.get("content"):
            if not first:
                first = time.perf_counter() - t0
            text += delta["content"]
    return first, text


# roles, each run in its own process ---------------------------------------------------------


def role_pin(url: str, n_tokens: int) -> dict[str, Any]:
    from prefixcache import PrefixCache

    cache = PrefixCache.open(store=url, n_ctx=N_CTX)
    info = cache.pin(messages(n_tokens)[:1], name="bench-redis-ttft")
    cache.close()
    return {"n_tokens": info.n_tokens}


def role_restore(url: str, n_tokens: int) -> dict[str, Any]:
    from prefixcache import PrefixCache

    cache = PrefixCache.open(store=url, n_ctx=N_CTX)
    chunks = cache.chat(messages(n_tokens), stream=True, max_tokens=8, temperature=0)
    ttft, text = first_token_seconds(chunks)
    stats = cache.stats()
    # Again, with nothing live: the prefix now comes from this host's local tier.
    cache.store.flush()  # type: ignore[attr-defined]
    cache.kv.truncate(0)
    local_ttft, local_text = first_token_seconds(
        cache.chat(messages(n_tokens), stream=True, max_tokens=8, temperature=0)
    )
    cache.close()
    if local_text != text:
        raise SystemExit(f"local-tier output differs: {local_text!r} vs {text!r}")
    return {
        "ttft": ttft,
        "text": text,
        "restored": stats["restored_tokens"],
        "restore_s": stats["restore_seconds"],
        "local_ttft": local_ttft,
    }


def role_cold(n_tokens: int) -> dict[str, Any]:
    import llama_cpp

    from prefixcache import config

    llm = llama_cpp.Llama(
        str(config.resolve_model(None)),
        n_ctx=N_CTX,
        verbose=False,
        chat_format="chat_template.default",
    )
    chunks = llm.create_chat_completion(
        messages=messages(n_tokens), stream=True, max_tokens=8, temperature=0
    )
    ttft, text = first_token_seconds(chunks)
    return {"ttft": ttft, "text": text}


def run_role(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--role", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# the benchmark ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), *options, "--maxmemory-policy", "noeviction"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


def bench(runs: int, n_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="prefixcache-redis-ttft-") as tmp:
        work = Path(tmp)
        proc, port = start_redis(work)
        try:
            base = f"redis://127.0.0.1:{port}/0"
            pinned = run_role("pin", f"{base}?local={work / 'pinner'}", str(n_tokens))
            restore, cold, restore_only, local = [], [], [], []
            for i in range(runs):
                # A new worker each run, with an empty local tier: everything comes from Redis.
                tier = work / f"reader-{i}"
                r = run_role("restore", f"{base}?local={tier}", str(n_tokens))
                c = run_role("cold", "-", str(n_tokens))
                if r["text"] != c["text"]:
                    raise SystemExit(f"outputs differ: {r['text']!r} vs cold {c['text']!r}")
                if r["restored"] <= 0:
                    raise SystemExit("the reader restored nothing from Redis")
                restore.append(r["ttft"])
                restore_only.append(r["restore_s"])
                local.append(r["local_ttft"])
                cold.append(c["ttft"])
        finally:
            proc.kill()
            proc.wait()
    redis_s = statistics.median(restore)
    cold_s = statistics.median(cold)
    return {
        "prefix_tokens": pinned["n_tokens"],
        "runs": runs,
        "redis_ttft_s": redis_s,
        "cold_ttft_s": cold_s,
        "speedup": cold_s / redis_s,
        "redis_restore_s": statistics.median(restore_only),
        "local_tier_ttft_s": statistics.median(local),
        "redis_ttft_all_s": restore,
        "cold_ttft_all_s": cold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1500, help="rough size of the prefix")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, url, n_tokens = args.role[0], args.role[1], int(args.role[2])
        if role == "pin":
            result = role_pin(url, n_tokens)
        elif role == "restore":
            result = role_restore(url, n_tokens)
        else:
            result = role_cold(n_tokens)
        print(json.dumps(result))
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = bench(args.runs, args.tokens)
    if args.json:
        print(json.dumps(result))
        return
    print(f"prefix: {result['prefix_tokens']} tokens, {result['runs']} runs (medians)")
    print(
        f"  second worker, restored from Redis (empty local tier): {result['redis_ttft_s']:.3f} s"
    )
    print(f"  cold prefill (plain llama-cpp-python):                {result['cold_ttft_s']:.3f} s")
    print(f"  speedup: {result['speedup']:.1f}x")
    print(f"  (of the Redis TTFT, restoring the KV: {result['redis_restore_s']:.3f} s;")
    print(f"   the same worker again, from its local tier: {result['local_tier_ttft_s']:.3f} s)")


if __name__ == "__main__":
    main()
