# ruff: noqa: RUF001 (the tables use the multiplication and minus signs on purpose)
"""prefixcache against what users would use instead: cold prefill and llama-cpp-python's caches.

Run: ``.venv/bin/python bench/run.py`` (full, ~15 min on 2 cores) or ``--quick`` (~3 min).
Prints the tables, writes bench/results.md and bench/ttft.png. Every store and cache lives in a
temporary directory; the user's default store is never touched. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
from _common import (
    MAX_TOKENS,
    N_CTX,
    QUESTIONS,
    REPO,
    conversation,
    count_evals,
    dir_bytes,
    kv_tensor_bytes_per_token,
    load_llm,
    prefix_messages,
)
from llama_cpp.llama_cache import LlamaRAMCache
from llama_cpp.llama_grammar import LlamaGrammar

from prefixcache import PrefixCache
from prefixcache.radix import RadixIndex, common_prefix_length
from prefixcache.segment import Segment, segment_key
from prefixcache.template import ChatTemplate
from prefixcache.tools import call_grammar, parse_completion, parser_for_template

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    reps: int
    agent_turns: int
    many: tuple[int, ...]
    many_store: tuple[int, ...]
    agents: int
    switch_requests: int
    #: prefixcache's TTFT processes per size (cheap, and its ratio to the floor moves by about
    #: ±0.1 from one process to the next: 3 gave a median that a longer run did not confirm).
    pc_reps: int

    @property
    def pc_processes(self) -> int:
        """prefixcache's TTFT processes per size (at least one per question)."""
        return max(self.pc_reps, self.reps)


FULL = Plan((1024, 4096, 7800), 3, 20, (10, 100, 1000, 10000), (10, 100, 1000, 10000), 4, 12, 7)
QUICK = Plan((1024, 4096), 1, 5, (10, 100, 1000, 10000), (10, 100, 1000), 2, 4, 1)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# foreign CPU load ---------------------------------------------------------------------------


class LoadMonitor:
    """CPU cores used by processes outside this benchmark while each scenario ran.

    The machine is shared: another process spinning on the same two cores slows llama.cpp's
    threads a lot, so every scenario reports how busy the rest of the machine was.
    """

    def __init__(self) -> None:
        self.by_scenario: dict[str, float] = {}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _mine() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        busy, mine, wall = self._busy(), self._mine(), time.perf_counter()
        print(f"\n== {name}", flush=True)
        yield
        elapsed = time.perf_counter() - wall
        foreign = max(0.0, (self._busy() - busy) - (self._mine() - mine)) / max(elapsed, 1e-9)
        self.by_scenario[name] = foreign
        print(f"   ({elapsed:.0f} s; other processes used {foreign:.2f} cores meanwhile)")


# fresh-process workers ----------------------------------------------------------------------


def wait_quiet(max_wait: float = 30.0, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores.

    Called while this process is idle, so all CPU use seen is someone else's. Returns the wait.
    """
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while time.perf_counter() - t0 < max_wait:
        if psutil.cpu_percent(interval=0.5) / 100 * cores < threshold:
            break
    return time.perf_counter() - t0


#: A measurement during which other processes used more cores than this is taken again once.
CONTENDED = 0.4


def worker(
    method: str,
    prompt: Path,
    questions: Sequence[int] = (),
    d: Path | None = None,
    retries: int = 1,
) -> Any:
    cmd = [sys.executable, str(WORKER), method, "--prompt", str(prompt)]
    cmd += ["--questions", *map(str, questions)] if questions else []
    cmd += ["--dir", str(d)] if d else []
    best = None
    for attempt in range(1 + retries):
        wait_quiet()
        busy, mine, wall = LoadMonitor._busy(), LoadMonitor._mine(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        elapsed = time.perf_counter() - wall
        foreign = (LoadMonitor._busy() - busy) - (LoadMonitor._mine() - mine)
        result = None
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("@@RESULT "):
                result = json.loads(line[len("@@RESULT ") :])
                result["foreign_cores"] = max(0.0, foreign) / max(elapsed, 1e-9)
                break
        if result is None:
            break
        if best is None or result["foreign_cores"] < best["foreign_cores"]:
            best = result
        if best["foreign_cores"] < CONTENDED or attempt == retries:
            break
        print(f"   ({method}: other processes used {foreign / elapsed:.2f} cores; again)")
    if best is not None:
        return best
    raise RuntimeError(f"worker {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def scenario_ttft(plan: Plan, tmp: Path, tok: llama_cpp.Llama) -> dict[str, Any]:
    """Fresh process, pinned prefix + a short question: time to first streamed token."""
    out: dict[str, Any] = {}
    qs = list(range(1, plan.reps + 1))
    for n in plan.sizes:
        system = prefix_messages(tok, n)
        prompt = tmp / f"prompt-{n}.json"
        prompt.write_text(json.dumps(system))
        disk_dir, pc_dir = tmp / f"llama-disk-{n}", tmp / f"pc-{n}"
        r: dict[str, Any] = {"cold": [worker("cold", prompt, [q]) for q in qs]}
        print(f"   {n}: cold done", flush=True)
        r["disk_populate"] = worker("disk-populate", prompt, (), disk_dir, retries=0)
        r["disk_bytes"] = dir_bytes(disk_dir)[0]
        # A disk-cache hit pops its entry and saves a new one: re-running is the same situation.
        r["disk"] = [worker("disk", prompt, [q], disk_dir) for q in qs]
        print(f"   {n}: LlamaDiskCache done", flush=True)
        r["ram"] = worker("ram", prompt, qs)
        print(f"   {n}: LlamaRAMCache done", flush=True)
        r["pc_populate"] = worker("pc-populate", prompt, (), pc_dir, retries=0)
        # Each process on a copy of the store as pinned: it finds the pin alone, as the floor
        # assumes (on one shared store a later process would also find an earlier one's
        # autosaved question header, a few tokens past the pin).
        r["pc"] = []
        for i in range(plan.pc_processes):
            copy = tmp / f"pc-{n}-{i}"
            shutil.copytree(pc_dir, copy)
            r["pc"].append(worker("pc", prompt, [qs[i % len(qs)]], copy, retries=0))
            if i:
                shutil.rmtree(copy)
        # The same prompt again, on the first copy: its autosave stored all of it, so only its
        # last two tokens are evaluated (never a batch of one, which would not match the cold
        # run's numerics).
        r["pc_repeat"] = worker("pc", prompt, [qs[0]], tmp / f"pc-{n}-0", retries=0)
        print(f"   {n}: prefixcache done", flush=True)
        out[str(n)] = r
    return out


def summarize_ttft(raw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n, r in raw.items():
        cold_runs = [w["runs"][0] for w in r["cold"]]
        reference = {run["question"]: run["text"] for run in cold_runs}
        disk_runs = [w["runs"][0] for w in r["disk"]]
        ram_runs = r["ram"]["runs"]
        pc_runs = [w["runs"][0] for w in r["pc"]]

        def same(runs: list[dict[str, Any]], reference: dict[int, str] = reference) -> bool:
            return all(run["text"] == reference[run["question"]] for run in runs)

        pc_workers = r["pc"]
        repeat = r["pc_repeat"]["runs"][0]
        rows.append(
            {
                "target": int(n),
                "prompt_tokens": pc_runs[0]["prompt_tokens"],
                "pinned_tokens": r["pc_populate"]["pinned_tokens"],
                "cold": med([x["ttft_s"] for x in cold_runs]),
                "disk": med([x["ttft_s"] for x in disk_runs]),
                "ram": med([x["ttft_s"] for x in ram_runs]),
                "pc": med([x["ttft_s"] for x in pc_runs]),
                "ok_disk": same(disk_runs),
                "ok_ram": same(ram_runs),
                "ok_pc": same(pc_runs),
                "pc_repeat": repeat["ttft_s"],
                "ok_pc_repeat": same([repeat]),
                "restore_parts": {
                    k: med([w["restore_parts"][k] for w in pc_workers])
                    for k in pc_workers[0]["restore_parts"]
                },
                "rss_load_cold": med([w["rss_after_load"] for w in r["cold"]]),
                "rss_load_pc": med([w["rss_after_load"] for w in pc_workers]),
                "load_cold": med([w["load_s"] for w in r["cold"]]),
                "load_disk": med([w["load_s"] for w in r["disk"]]),
                "load_pc": med([w["load_s"] for w in pc_workers]),
                "disk_entry_bytes": r["disk_bytes"],
                "pc_restore_s": med([x["restore_s"] for x in pc_runs]),
                "pc_prefill_tokens": med([x["prefill_tokens"] for x in pc_runs]),
                "pc_restored_tokens": med([x["restored_tokens"] for x in pc_runs]),
                "prepare_restore_s": med([w["prepare_restore_s"] for w in pc_workers]),
                "prepare_restore_bytes": pc_workers[0]["prepare_restore_bytes"],
                "raw_set_s": med([w["raw_set_s"] for w in pc_workers]),
                "raw_set_bytes": pc_workers[0]["raw_set_bytes"],
                "suffix_eval_s": med([w["suffix_eval_s"] for w in pc_workers]),
                "suffix_tokens": pc_workers[0]["suffix_tokens"],
                "rss_cold": med([x["max_rss"] for x in cold_runs]),
                "rss_disk": med([x["max_rss"] for x in disk_runs]),
                "rss_pc": med([x["max_rss"] for x in pc_runs]),
                "pin_s": r["pc_populate"]["populate_s"],
                "foreign_max": max(
                    w["foreign_cores"] for w in [*r["cold"], *r["disk"], r["ram"], *r["pc"]]
                ),
            }
        )
    return rows


# agent loop ---------------------------------------------------------------------------------


def _agent_module() -> Any:
    spec = importlib.util.spec_from_file_location("agent_loop", REPO / "examples" / "agent_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _agent_questions(n: int) -> list[str]:
    """The example's questions, then again with a ticket number (each turn's text differs)."""
    base = _agent_module().QUESTIONS
    return [base[i] if i < len(base) else f"{base[i % len(base)]} (ticket {i})" for i in range(n)]


def _reply_key(message: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """What a reply says: its text and its calls (the ids are random, so not compared)."""
    calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []
    ]
    return message.get("content"), calls


class _LlamaChat:
    """llama-cpp-python's own chat call, made as prefixcache makes it: the same rendering (tools
    folded into the prompt for SmolLM2), the same grammar for a required call, the same parsing of
    the reply into tool_calls. ``method`` "cold" resets the model before every request; "ram"
    gives it a LlamaRAMCache. Each request's time, prompt and prefilled tokens go to ``rows``."""

    def __init__(self, method: str, tools: list[dict[str, Any]], max_tokens: int) -> None:
        self.llm = load_llm()
        if method == "ram":
            self.llm.set_cache(LlamaRAMCache())
        self.cold = method == "cold"
        self.template = ChatTemplate(self.llm)
        self.parser = parser_for_template(self.template.source, self.template.native_tools)
        self.tools, self.max_tokens = tools, max_tokens
        self.evals = count_evals(self.llm)
        self.rows: list[dict[str, Any]] = []

    def __call__(self, messages: list[dict[str, Any]], tool_choice: str) -> dict[str, Any]:
        msgs, tool_arg = self.template.messages_for(messages, self.tools)
        grammar = None
        if tool_choice == "required":
            gbnf = call_grammar(self.parser, self.tools, parallel=False)
            grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        if self.cold:
            self.llm.reset()
        wait_quiet(10)
        self.evals.clear()
        t = time.perf_counter()
        res = self.llm.create_chat_completion(
            messages=msgs,  # type: ignore[arg-type]
            tools=tool_arg,  # type: ignore[arg-type]
            grammar=grammar,
            max_tokens=self.max_tokens,
            temperature=0,
        )
        seconds = time.perf_counter() - t
        if tool_choice != "none":
            res = parse_completion(res, self.parser)  # type: ignore[arg-type]
        self.rows.append(
            {
                "tool_choice": tool_choice,
                "seconds": seconds,
                "prompt": res["usage"]["prompt_tokens"],
                "prefill": self.evals[0] if self.evals else 0,
                "reply": _reply_key(res["choices"][0]["message"]),
            }
        )
        return res  # type: ignore[return-value]


def scenario_agent(plan: Plan, tmp: Path) -> dict[str, Any]:
    """An agent loop whose tool calls the model makes (examples/agent_loop.py): each turn, a call
    forced with tool_choice="required" (a grammar), the tool runs, then "auto" and a last "none"
    step until the model answers. The cold run makes the transcript (its calls run, its replies
    go into the history); LlamaRAMCache and prefixcache answer the same requests, and each of
    their replies is compared with the cold one."""
    agent = _agent_module()
    tools, questions = agent.TOOLS, _agent_questions(plan.agent_turns)
    system = [{"role": "system", "content": agent.SYSTEM}]

    out: dict[str, Any] = {}
    # The cold run makes the transcript: every request's messages and tool_choice, its reply.
    requests: list[tuple[int, str, list[dict[str, Any]]]] = []
    cold_replies: list[Any] = []
    for method in ("cold", "ram"):
        wait_quiet()
        chat = _LlamaChat(method, tools, agent.MAX_TOKENS)
        if method == "cold":
            messages: list[dict[str, Any]] = list(system)
            for turn, question in enumerate(questions, 1):
                messages.append({"role": "user", "content": question})
                # agent_turn appends each reply (and the tool results) after yielding it, so
                # at the yield, messages are the request's prompt.
                for choice, _ in agent.agent_turn(chat, messages):
                    requests.append((turn, choice, list(messages)))
            cold_replies = [row["reply"] for row in chat.rows]
        else:
            for _, choice, msgs in requests:
                chat(msgs, tool_choice=choice)
        for row, (turn, _, _), cold in zip(chat.rows, requests, cold_replies, strict=True):
            row["turn"] = turn
            row["same"] = row["reply"] == cold
        out[method] = chat.rows
        chat.llm.close()
    store = tmp / "agent-store"
    wait_quiet()
    cache = PrefixCache.open(store=store, n_ctx=N_CTX)
    t = time.perf_counter()
    pin = cache.pin(system, name="agent", tools=tools)
    out["pin_s"] = time.perf_counter() - t
    out["pin_tokens"] = pin.n_tokens
    rows, growth = [], []
    for i, (turn, choice, msgs) in enumerate(requests):
        wait_quiet(10)
        t = time.perf_counter()
        res = cache.chat(
            msgs,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=agent.MAX_TOKENS,
            temperature=0,
        )
        seconds = time.perf_counter() - t
        usage = res["usage"]
        rows.append(
            {
                "turn": turn,
                "tool_choice": choice,
                "seconds": seconds,
                "prompt": usage["prompt_tokens"],
                "prefill": usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"],
                "same": _reply_key(res["choices"][0]["message"]) == cold_replies[i],
                "reply": _reply_key(res["choices"][0]["message"]),
            }
        )
        if i + 1 == len(requests) or requests[i + 1][0] != turn:  # the turn's last request
            segs = list(cache.store.segments())
            allocated, apparent = dir_bytes(store)
            growth.append(
                {
                    "turn": turn,
                    "segments": len(segs),
                    "unique_tokens": sum(len(s.tokens) for s in segs),
                    "store_bytes": cache.store.total_bytes(),
                    "du_bytes": allocated,
                    "apparent_bytes": apparent,
                }
            )
    out["pc"] = rows
    out["growth"] = growth
    out["raw_bpt"] = kv_tensor_bytes_per_token(cache.llm)
    cache.close()
    return out


# many prefixes ------------------------------------------------------------------------------


def _synthetic_tree(
    n: int, prompt: list[int], rng: random.Random, follow_max: int = 200
) -> list[tuple[str, str | None, list[int]]]:
    """``n`` segments: a stored conversation covering 7,000 tokens of the prompt in 1,000-token
    segments, plus branches off random segments; half of those follow the prompt for a while
    before diverging, so the prompt's path through the tree is split many times."""
    segs: list[tuple[str, str | None, list[int]]] = []
    ends: dict[str | None, int] = {None: 0}
    on_path: list[str | None] = [None]
    parent: str | None = None
    for a in range(0, 7000, 1000):
        if len(segs) >= n:
            break
        key = f"main{a}"
        segs.append((key, parent, prompt[a : a + 1000]))
        ends[key] = a + 1000
        on_path.append(key)
        parent = key
    keys: list[str | None] = [None, *(k for k, _, _ in segs)]
    while len(segs) < n:
        i = len(segs)
        length = rng.randint(32, 512)
        if rng.random() < 0.5:
            par = rng.choice(on_path)
            at = ends[par]
            follow = rng.randint(1, follow_max) if follow_max else 0
            toks = prompt[at : at + follow] + [rng.randrange(1, 49000) for _ in range(length)]
        else:
            par = rng.choice(keys)
            toks = [rng.randrange(1, 49000) for _ in range(length)]
        key = f"b{i}"
        segs.append((key, par, toks))
        ends[key] = ends[par] + len(toks)
        keys.append(key)
    return segs


def _path_nodes(index: RadixIndex, prompt: list[int]) -> int:
    """Tree nodes a lookup of ``prompt`` visits (what its cost grows with)."""
    node, pos, count = index._root, 0, 0
    while pos < len(prompt):
        child = node.children.get(prompt[pos])
        if child is None:
            break
        k = common_prefix_length(child.edge, prompt[pos : pos + len(child.edge)])
        count += 1
        pos += k
        if k < len(child.edge):
            break
        node = child
    return count


def _time_calls(fn: Callable[[], Any], n: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return med(times)


def scenario_many(plan: Plan, tmp: Path) -> dict[str, Any]:
    """Lookup time for an 8k-token prompt with 10 .. 10,000 stored segments."""
    rng = random.Random(5)
    prompt = [rng.randrange(1, 49000) for _ in range(8000)]
    out: dict[str, Any] = {"radix": [], "store": []}
    for n, shape in [(n, shape) for n in plan.many for shape in ("branchy", "disjoint")]:
        segs = _synthetic_tree(n, prompt, rng, 200 if shape == "branchy" else 0)
        index = RadixIndex()
        t = time.perf_counter()
        for key, parent, toks in segs:
            index.insert(key, parent, toks)
        build = time.perf_counter() - t
        match = index.match(prompt)
        out["radix"].append(
            {
                "n": n,
                "shape": shape,
                "path_nodes": _path_nodes(index, prompt),
                "tokens": sum(len(s[2]) for s in segs),
                "build_s": build,
                "match_s": _time_calls(lambda index=index: index.match(prompt)),
                "matched": match.length,
            }
        )
        print(f"   radix {n} {shape}: {out['radix'][-1]['match_s'] * 1e3:.3f} ms", flush=True)
    llm = load_llm()
    for n in plan.many_store:
        segs = _synthetic_tree(n, prompt, rng)
        cache = PrefixCache(llm, store=tmp / f"many-{n}")
        root = cache.root()
        real: dict[str | None, str] = {None: root}
        starts: dict[str | None, int] = {None: 0}
        t = time.perf_counter()
        for key, parent, toks in segs:
            p = real[parent]
            k = segment_key(p, toks)
            seg = Segment(
                key=k,
                parent=p,
                root=root,
                start=starts[parent],
                tokens=tuple(toks),
                nbytes=16,
                checksum="xxh3:0000000000000000",
                fingerprint=cache.fingerprint.digest,
                label="synthetic",
            )
            cache.store.put(seg, bytes(16))
            real[key] = k
            starts[key] = starts[parent] + len(toks)
        populate = time.perf_counter() - t
        t = time.perf_counter()
        first = cache.lookup(prompt)
        first_s = time.perf_counter() - t
        out["store"].append(
            {
                "n": n,
                "populate_s": populate,
                "first_lookup_s": first_s,
                "lookup_s": _time_calls(lambda cache=cache: cache.lookup(prompt)),
                "matched": first.length,
            }
        )
        print(f"   store {n}: {out['store'][-1]['lookup_s'] * 1e3:.3f} ms", flush=True)
        cache.store.close()
    return out


# context switching --------------------------------------------------------------------------


def scenario_switch(plan: Plan, tmp: Path, tok: llama_cpp.Llama) -> dict[str, Any]:
    """Agents with different ~1k-token pinned prefixes served round-robin by one model."""
    agents = [prefix_messages(tok, 1024, agent=i + 1) for i in range(plan.agents)]
    requests = [(r % plan.agents, 1 + r // plan.agents) for r in range(plan.switch_requests)]
    out: dict[str, Any] = {}
    reference: list[str] = []
    for method in ("cold", "ram", "pc"):
        wait_quiet()
        setup = 0.0
        if method == "pc":
            cache = PrefixCache.open(store=tmp / "switch-store", n_ctx=N_CTX)
            t = time.perf_counter()
            for i, system in enumerate(agents):
                cache.pin(system, name=f"agent-{i}")
            setup = time.perf_counter() - t

            def ask(messages: list[dict[str, str]], cache: PrefixCache = cache) -> str:
                res = cache.chat(messages, max_tokens=MAX_TOKENS, temperature=0)
                return str(res["choices"][0]["message"]["content"])

        else:
            llm = load_llm()

            def ask(
                messages: list[dict[str, str]], llm: llama_cpp.Llama = llm, method: str = method
            ) -> str:
                if method == "cold":
                    llm.reset()
                res = llm.create_chat_completion(
                    messages=messages, max_tokens=MAX_TOKENS, temperature=0
                )
                return str(res["choices"][0]["message"]["content"])

            if method == "ram":
                llm.set_cache(LlamaRAMCache())
                t = time.perf_counter()
                for system in agents:  # a first round fills the cache (not timed below)
                    ask(conversation(system, QUESTIONS[0]))
                setup = time.perf_counter() - t
        lat, texts = [], []
        for agent, q in requests:
            wait_quiet(10)
            t = time.perf_counter()
            texts.append(ask(conversation(agents[agent], QUESTIONS[q])))
            lat.append(time.perf_counter() - t)
        if method == "cold":
            reference = texts
        out[method] = {
            "setup_s": setup,
            "total_s": sum(lat),
            "median_s": med(lat),
            "max_s": max(lat),
            "same": sum(a == b for a, b in zip(texts, reference, strict=True)),
        }
        print(f"   {method}: {sum(lat):.1f} s", flush=True)
    out["requests"] = len(requests)
    out["agents"] = plan.agents
    return out


# reporting ----------------------------------------------------------------------------------


def scenario_redis(plan: Plan) -> dict[str, Any] | None:
    """A second worker's TTFT restoring from Redis vs cold prefill (bench/redis_ttft.py).

    None when redis-server is not installed (the report says so).
    """
    if shutil.which("redis-server") is None:
        print("   redis-server is not installed: skipped")
        return None
    cmd = [sys.executable, str(HERE / "redis_ttft.py"), "--json", "--tokens", "3000"]
    cmd += ["--runs", str(max(3, plan.reps))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, check=False)
    if proc.returncode != 0:
        print(f"   redis_ttft.py failed:\n{proc.stderr[-2000:]}")
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "python": platform.python_version(),
        "llama-cpp-python": llama_cpp.__version__,
        "model": "SmolLM2-135M-Instruct Q4_1 (bundled), n_ctx 8192, n_batch 512, ChatML",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: dict[str, Any], plan: Plan, elapsed: float, quick: bool) -> tuple[str, list[str]]:
    md: list[str] = []
    targets: list[str] = []
    ttft = res["ttft"]
    by_n = {r["target"]: r for r in ttft}
    at4k = by_n.get(4096)

    md.append("## 1. Fresh process, pinned prefix + short question: time to first token\n")
    md.append(
        "Each cell: median over fresh processes (LlamaRAMCache: one process, an unrelated request "
        "before each timed one so the prefix must come from the cache). ✓: greedy output equals "
        f"the cold run's for the same question ({MAX_TOKENS} tokens). 'exact repeat': the same "
        "prompt a second time, in a fresh process; autosave stored all of it, so only its last "
        "two tokens are evaluated (a batch of one would not match the cold run's numerics).\n"
    )
    rows = []
    for r in ttft:
        rows.append(
            [
                f"~{r['target']} ({r['prompt_tokens']})",
                ms(r["cold"]),
                ms(r["disk"]) + (" ✓" if r["ok_disk"] else " ✗"),
                ms(r["ram"]) + (" ✓" if r["ok_ram"] else " ✗"),
                ms(r["pc"]) + (" ✓" if r["ok_pc"] else " ✗"),
                ms(r["pc_repeat"]) + (" ✓" if r["ok_pc_repeat"] else " ✗"),
                f"{r['cold'] / r['pc']:.0f}×",
                f"{r['disk'] / r['pc']:.1f}×",
                f"{r['ram'] / r['pc']:.1f}×",
                f"{r['foreign_max']:.2f}",
            ]
        )
    md.append(
        table(
            [
                "prefix tokens (prompt)",
                "cold",
                "LlamaDiskCache",
                "LlamaRAMCache",
                "prefixcache",
                "prefixcache, exact repeat",
                "cold/pc",
                "disk/pc",
                "ram/pc",
                "other load (max cores)",
            ],
            rows,
        )
    )
    md.append("\nModel load (separate from TTFT) and what the time is made of:\n")
    rows = []
    for r in ttft:
        floor = r["raw_set_s"] + r["suffix_eval_s"]
        rows.append(
            [
                r["target"],
                ms(r["load_cold"]),
                ms(r["load_disk"]),
                ms(r["load_pc"]),
                mb(r["disk_entry_bytes"]),
                ms(r["pc_restore_s"]),
                f"{r['pc_prefill_tokens']:.0f}",
                ms(floor),
                f"{r['pc'] / floor:.2f}×",
            ]
        )
    md.append(
        table(
            [
                "prefix",
                "load cold",
                "load +disk cache",
                "load prefixcache",
                "LlamaDiskCache on disk",
                "pc restore",
                "pc prefill tokens",
                "floor (raw set_data + suffix eval)",
                "pc TTFT / floor",
            ],
            rows,
        )
    )
    if at4k:
        speed = at4k["cold"] / at4k["pc"]
        targets.append(
            f"warm TTFT ≥ 50× faster than cold at 4k: {speed:.0f}× → {verdict(speed >= 50)}"
        )
        floor = at4k["raw_set_s"] + at4k["suffix_eval_s"]
        ratio = at4k["pc"] / floor
        why = ""
        if ratio > 1.2:
            other = at4k["pc"] - at4k["pc_restore_s"] - at4k["suffix_eval_s"]
            parts = at4k["restore_parts"]
            why = (
                f" — pc TTFT {ms(at4k['pc'])} = restore {ms(at4k['pc_restore_s'])} (first restore "
                f"in the process; warm: map {ms(parts['read'])} + XXH3 "
                f"{ms(parts['checksum'])} + set_data/seq_cp {ms(parts['set_data'])}; the usage "
                f"touch, {ms(parts['touch'])}, comes after the reply; raw set_data alone "
                f"{ms(at4k['raw_set_s'])}) + suffix "
                f"eval {ms(at4k['suffix_eval_s'])} + {ms(other)} elsewhere (template, tokenize, "
                "index sync, llama-cpp-python's per-request setup, first sample)"
            )
        targets.append(
            f"4k TTFT within 1.2× of (suffix-only eval + raw set_data = {ms(floor)}): "
            f"{ratio:.2f}× → {verdict(ratio <= 1.2)}{why}"
        )
        vs_disk = at4k["disk"] / at4k["pc"]
        why = ""
        if vs_disk < 10:
            floor = at4k["raw_set_s"] + at4k["suffix_eval_s"]
            why = (
                f" — both pay the suffix evaluation ({ms(at4k['suffix_eval_s'])} for "
                f"{at4k['pc_prefill_tokens']:.0f} tokens at this depth), so even a free restore "
                f"would be only {at4k['disk'] / floor:.1f}× faster than LlamaDiskCache's "
                f"{ms(at4k['disk'])} (which loads a {mb(at4k['disk_entry_bytes'])} entry)"
            )
        targets.append(
            f"≥ 10× faster than LlamaDiskCache (fresh process, 4k): {vs_disk:.1f}× → "
            f"{verdict(vs_disk >= 10)}{why}"
        )
        ok = all(r["ok_pc"] for r in ttft)
        targets.append(f"prefixcache output equals cold output in every TTFT run → {verdict(ok)}")

    md.append("\n## 2. Restore throughput (as prepare() does it) vs the raw floor\n")
    rows = []
    for r in ttft:
        pc_bps = r["prepare_restore_bytes"] / r["prepare_restore_s"]
        raw_bps = r["raw_set_bytes"] / r["raw_set_s"]
        parts = r["restore_parts"]
        rows.append(
            [
                r["target"],
                mb(r["prepare_restore_bytes"]),
                ms(r["prepare_restore_s"]),
                " + ".join(ms(parts[k]) for k in ("read", "checksum", "set_data", "touch")),
                f"{pc_bps / 1e9:.2f} GB/s",
                mb(r["raw_set_bytes"]),
                ms(r["raw_set_s"]),
                f"{raw_bps / 1e9:.2f} GB/s",
                f"{raw_bps / pc_bps:.1f}×",
            ]
        )
    md.append(
        table(
            [
                "prefix",
                "restored",
                "prepare() restore",
                "map + XXH3 + set_data/seq_cp (+ touch, after the reply)",
                "throughput",
                "raw bytes",
                "bare set_data",
                "raw throughput",
                "raw/pc",
            ],
            rows,
        )
    )
    md.append(
        "\nprepare() restore = per segment: map the diskcache file (page cache warm; no copy) + "
        "XXH3 + llama_state_seq_set_data into the scratch sequence + seq_cp; the usage touch "
        "(SQLite write) is made after the reply. Bare = one llama_state_seq_set_data of one "
        "blob already in memory."
    )

    md.append("\n## 3. Peak RSS of a fresh process serving one request\n")
    rows = []
    for r in ttft:
        seg = min(r["pinned_tokens"], 1024) * (
            r["prepare_restore_bytes"] / max(1, r["prompt_tokens"])
        )
        rows.append(
            [
                r["target"],
                mb(r["rss_cold"]),
                mb(r["rss_disk"]),
                mb(r["rss_pc"]),
                mb(r["rss_pc"] - r["rss_cold"]),
                mb(seg),
                mb(r["rss_load_cold"]),
                mb(r["rss_load_pc"]),
            ]
        )
    md.append(
        table(
            [
                "prefix",
                "cold (model + KV)",
                "LlamaDiskCache",
                "prefixcache",
                "pc − cold",
                "one segment",
                "cold, after load",
                "pc, after open",
            ],
            rows,
        )
    )

    md.append(
        "\nPeak = ru_maxrss at the end of the request. 'after load': before any request (the "
        "KV buffer of n_ctx 8192 is allocated and cleared at load)."
    )

    ag = res["agent"]
    # results.json from before model-made calls: one request per turn, growth in the pc rows.
    growth = ag.get("growth", ag["pc"])
    n_turns = len(growth)
    md.append(f"\n## 4. Agent loop: {n_turns} tool-using turns on one pinned prefix\n")
    md.append(
        f"Pinned prefix: {ag['pin_tokens']} tokens (system + tool schemas), pinned in "
        f"{ms(ag['pin_s'])} before turn 1 (not in the totals). The model makes the tool calls "
        "(examples/agent_loop.py): each turn is a user question, then a call forced with "
        'tool_choice="required" (a grammar), the tool\'s result, and "auto" then "none" steps '
        "until the model answers. The cold run makes the transcript (its calls run and its "
        "replies go into the history), so every method gets identical prompts; 'same' counts "
        "requests whose reply (text and calls) equals the cold reply.\n"
    )
    rows = []
    for m, label in (("cold", "cold"), ("ram", "LlamaRAMCache"), ("pc", "prefixcache")):
        tr = ag[m]
        rows.append(
            [
                label,
                len(tr),
                sum(t["prompt"] for t in tr),
                sum(t["prefill"] for t in tr),
                f"{sum(t['seconds'] for t in tr):.1f} s",
                f"{sum(t.get('same', True) for t in tr)}/{len(tr)}",
            ]
        )
    md.append(
        table(
            ["method", "requests", "prompt tokens", "prefilled tokens", "total time", "same"],
            rows,
        )
    )
    if all("turn" in t for m in ("cold", "ram", "pc") for t in ag[m]):
        md.append("\nPer turn: prompt tokens (all requests of the turn) vs prefilled, and time:\n")
        rows = []
        for turn in range(1, n_turns + 1):
            per = {m: [t for t in ag[m] if t["turn"] == turn] for m in ("cold", "ram", "pc")}
            rows.append(
                [
                    turn,
                    " → ".join(t["tool_choice"] for t in per["cold"]),
                    sum(t["prompt"] for t in per["cold"]),
                    *(sum(t["prefill"] for t in per[m]) for m in ("cold", "ram", "pc")),
                    *(f"{sum(t['seconds'] for t in per[m]):.2f} s" for m in ("cold", "ram", "pc")),
                    "✓" if all(t["same"] for m in ("ram", "pc") for t in per[m]) else "✗",
                ]
            )
        md.append(
            table(
                [
                    "turn",
                    "requests (tool_choice)",
                    "prompt",
                    "prefilled cold",
                    "prefilled RAM",
                    "prefilled pc",
                    "time cold",
                    "time RAM",
                    "time pc",
                    "same",
                ],
                rows,
            )
        )
    raw_bpt = ag["raw_bpt"]
    md.append(f"\nStore growth per turn (raw K+V tensor bytes per token: {raw_bpt:,}):\n")
    rows = []
    for i, t in enumerate(growth, 1):
        rows.append(
            [
                i,
                t["segments"],
                t["unique_tokens"],
                f"{t['store_bytes']:,}",
                f"{t['store_bytes'] / t['unique_tokens']:,.0f}",
                f"{t['du_bytes']:,}",
                f"{t['du_bytes'] / t['unique_tokens']:,.0f}",
            ]
        )
    md.append(
        table(
            [
                "turn",
                "segments",
                "unique tokens",
                "store bytes",
                "bytes/token",
                "du bytes",
                "du/token",
            ],
            rows,
        )
    )
    xs = [t["unique_tokens"] for t in growth]
    fits = {}
    for key in ("store_bytes", "du_bytes"):
        ys = [t[key] for t in growth]
        fits[key] = _fit(xs, ys)
    md.append(
        "\nLinear fit bytes = a·unique_tokens + b: store accounting a = "
        f"{fits['store_bytes'][0]:,.1f} B/token, b = {fits['store_bytes'][1]:,.0f} B, "
        f"R² = {fits['store_bytes'][2]:.6f}; du a = {fits['du_bytes'][0]:,.1f} B/token, "
        f"b = {fits['du_bytes'][1]:,.0f} B, R² = {fits['du_bytes'][2]:.6f}."
    )

    md.append("\n## 5. Storage: bytes per unique token vs raw KV bytes per token\n")
    rows = []
    stores = res["storage"]
    for s in stores:
        rows.append(
            [
                s["name"],
                s["unique_tokens"],
                f"{s['store_bytes'] / s['unique_tokens']:,.0f}",
                f"{s['du_bytes'] / s['unique_tokens']:,.0f}",
                f"{s['du_bytes'] / s['unique_tokens'] / raw_bpt:.4f}×",
            ]
        )
    md.append(
        table(["store", "unique tokens", "accounted B/token", "du B/token", "du / raw"], rows)
    )
    big = max(stores, key=lambda s: s["unique_tokens"])
    ratio = big["du_bytes"] / big["unique_tokens"] / raw_bpt
    small = min(stores, key=lambda s: s["unique_tokens"])
    sratio = small["du_bytes"] / small["unique_tokens"] / raw_bpt
    why = ""
    if max(ratio, sratio) > 1.05:
        why = (
            f" — smallest store ({small['name']}, {small['unique_tokens']} tokens) "
            f"{sratio:.3f}×: fixed SQLite/WAL overhead "
            f"{mb(small['du_bytes'] - small['store_bytes'])} "
            "does not amortise over few tokens"
        )
    targets.append(
        f"storage ≤ 1.05× raw KV bytes per unique token: {ratio:.4f}× ({big['name']}, du) "
        f"→ {verdict(ratio <= 1.05)}{why}"
    )
    targets.append(
        f"storage grows linearly with unique tokens (agent loop): du slope "
        f"{fits['du_bytes'][0] / raw_bpt:.4f}× raw, R² {fits['du_bytes'][2]:.5f} → "
        f"{verdict(fits['du_bytes'][2] > 0.99 and fits['du_bytes'][0] / raw_bpt <= 1.05)}"
    )

    many = res["many"]
    md.append("\n## 6. Many stored segments: lookup for an 8,000-token prompt\n")
    md.append(
        "RadixIndex.match on an index of N synthetic segments (token spans only): a 7-segment "
        "conversation covering 7,000 prompt tokens plus N-7 branches off random segments. "
        "'branchy': half of the branches follow the prompt for 1-200 tokens before diverging, so "
        "the prompt's path is split at many points (a worst case); 'disjoint': branches diverge "
        "where their parent ends. PrefixCache.lookup runs on a real DiskStore holding the "
        "branchy N segments with real metadata and 16 bytes of synthetic KV each (a lookup reads "
        "no KV and does no model work); 'first' includes loading the index from the store.\n"
    )
    store_by_n = {s["n"]: s for s in many["store"]}
    rows = []
    for r in many["radix"]:
        s = store_by_n.get(r["n"]) if r["shape"] == "branchy" else None
        rows.append(
            [
                r["n"],
                r["shape"],
                r["path_nodes"],
                f"{r['tokens']:,}",
                f"{r['match_s'] * 1e3:.3f} ms",
                r["matched"],
                f"{s['lookup_s'] * 1e3:.3f} ms" if s else "—",
                ms(s["first_lookup_s"]) if s else "—",
                ms(s["populate_s"]) if s else "—",
            ]
        )
    md.append(
        table(
            [
                "segments",
                "shape",
                "nodes on the prompt's path",
                "tokens indexed",
                "RadixIndex.match",
                "matched",
                "PrefixCache.lookup",
                "first lookup",
                "populate store",
            ],
            rows,
        )
    )
    top = max(many["radix"], key=lambda r: (r["n"], r["match_s"]))
    calm = max((r for r in many["radix"] if r["shape"] == "disjoint"), key=lambda r: r["n"])
    worst = top["match_s"]
    stop = store_by_n.get(top["n"])
    if stop:
        worst = max(worst, stop["lookup_s"])
    targets.append(
        f"lookup < 1 ms at {top['n']:,} segments: RadixIndex.match "
        f"{top['match_s'] * 1e3:.3f} ms"
        + (f", PrefixCache.lookup {stop['lookup_s'] * 1e3:.3f} ms" if stop else "")
        + f" → {verdict(worst < 1e-3)}"
        + (
            f" — the branchy tree puts {top['path_nodes']:,} nodes on the prompt's path "
            f"({top['match_s'] / top['path_nodes'] * 1e6:.2f} µs each, a Python loop step); "
            f"with branches at segment ends ({calm['path_nodes']} nodes) it takes "
            f"{calm['match_s'] * 1e3:.3f} ms"
            if worst >= 1e-3
            else ""
        )
    )

    sw = res["switch"]
    md.append(
        f"\n## 7. Context switching: {sw['agents']} agents (~1k-token pinned prefixes), "
        f"{sw['requests']} requests round-robin on one Llama\n"
    )
    rows = []
    for m, label in (("cold", "cold"), ("ram", "LlamaRAMCache"), ("pc", "prefixcache")):
        s = sw[m]
        rows.append(
            [
                label,
                ms(s["setup_s"]),
                f"{s['total_s']:.2f} s",
                ms(s["median_s"]),
                ms(s["max_s"]),
                f"{sw['cold']['total_s'] / s['total_s']:.1f}×",
                f"{s['same']}/{sw['requests']}",
            ]
        )
    md.append(
        table(
            [
                "method",
                "setup (pin / fill)",
                "total",
                "median request",
                "max request",
                "speedup",
                "same",
            ],
            rows,
        )
    )
    md.append(f"\nRequests: {MAX_TOKENS} tokens generated each, greedy.")

    md.append("\n## 8. Shared store on Redis: a second worker's time to first token\n")
    red = res.get("redis")
    if red is None:
        md.append("Skipped: redis-server is not installed on this machine.")
    elif "error" in red:
        md.append(f"Failed: {red['error']}")
    else:
        md.append(
            "One worker pins a system prompt through a Redis store; then a fresh worker process "
            "with an empty local tier asks a question under it (`bench/redis_ttft.py`, medians "
            f"over {red['runs']} runs, each a new process).\n"
        )
        md.append(
            table(
                [
                    "prefix tokens",
                    "cold prefill",
                    "second worker, from Redis",
                    "of which restore",
                    "same worker again, local tier",
                    "cold / Redis",
                ],
                [
                    [
                        red["prefix_tokens"],
                        ms(red["cold_ttft_s"]),
                        ms(red["redis_ttft_s"]),
                        ms(red["redis_restore_s"]),
                        ms(red["local_tier_ttft_s"]),
                        f"{red['speedup']:.1f}×",
                    ]
                ],
            )
        )

    md.append("\n## Other processes on the machine\n")
    md.append(
        table(
            ["scenario", "CPU cores used by other processes"],
            [[k, f"{v:.2f}"] for k, v in res["load"].items()],
        )
    )

    head = ["# prefixcache benchmark results\n"]
    mode = "quick (`--quick`)" if quick else "full"
    head.append(
        f"Mode: {mode}; {plan.reps} repetition(s) per TTFT cell ({plan.pc_processes} "
        "for prefixcache, each on a fresh copy of the pinned store); total wall time "
        f"{elapsed / 60:.1f} min. Command: `.venv/bin/python bench/run.py"
        + (" --quick`" if quick else "`")
        + ".\n"
    )
    head.append(table(["", ""], [[k, v] for k, v in res["machine"].items()]))
    head.append("\n## Targets\n")
    head.extend(f"- {t}" for t in targets)
    head.append("")
    return "\n".join([*head, *md]) + "\n", targets


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    n = len(xs)
    if n < 2:
        return (ys[0] / xs[0] if xs and xs[0] else 0.0), 0.0, 1.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    a = sxy / sxx if sxx else 0.0
    b = my - a * mx
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def plot(ttft: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["prompt_tokens"] for r in ttft]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (
        ("cold", "cold prefill (no cache)", "o-"),
        ("disk", "llama-cpp-python LlamaDiskCache (fresh process)", "s--"),
        ("ram", "llama-cpp-python LlamaRAMCache (same process)", "^:"),
        ("pc", "prefixcache (fresh process)", "D-"),
    ):
        ax.plot(xs, [r[key] for r in ttft], style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (pinned prefix + question)")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title("SmolLM2-135M Q4_1, CPU: time to first token vs prefix length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def storage_rows(tmp: Path, ttft_sizes: Sequence[int], agent_dir: Path) -> list[dict[str, Any]]:
    """du and the store's own accounting for every store the run built with real KV."""
    from prefixcache.store.disk import DiskStore

    rows = []
    named = [(f"TTFT pins ~{n}", tmp / f"pc-{n}") for n in ttft_sizes]
    named += [("agent loop", agent_dir), ("context switching", tmp / "switch-store")]
    for name, d in named:
        if not d.exists():
            continue
        store = DiskStore(d)
        segs = list(store.segments())
        rows.append(
            {
                "name": name,
                "unique_tokens": sum(len(s.tokens) for s in segs),
                "store_bytes": store.total_bytes(),
                "du_bytes": dir_bytes(d)[0],
            }
        )
        store.close()
    return rows


def write_results(path: Path, text: str) -> None:
    """Write the report, keeping the sections other benchmarks wrote in the file (between their
    ``<!-- NAME: written by ... -->`` and ``<!-- /NAME -->`` markers, bench/llama_server.py's)."""
    old = path.read_text() if path.exists() else ""
    kept = [
        m.group(0) for m in re.finditer(r"<!-- ([\w-]+): written by .*?<!-- /\1 -->", old, re.S)
    ]
    path.write_text(text.rstrip("\n") + "".join("\n\n" + k for k in kept) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (~3 min)")
    parser.add_argument("--out", default=str(HERE), help="folder for results.md and ttft.png")
    parser.add_argument(
        "--report-only", metavar="JSON", help="rewrite results.md and ttft.png from results.json"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the run, not after it: nothing is lost
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        plan = QUICK if res["quick"] else FULL
        text, _ = report(res, plan, res["elapsed_s"], res["quick"])
        write_results(out / "results.md", text)
        plot(res["ttft"], out / "ttft.png")
        print(text)
        return
    start = time.perf_counter()
    monitor = LoadMonitor()
    res: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="prefixcache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tok = load_llm(vocab_only=True)
        with monitor.scenario("TTFT, fresh process"):
            raw = scenario_ttft(plan, tmp, tok)
            res["ttft_raw"] = raw
            res["ttft"] = summarize_ttft(raw)
        with monitor.scenario("agent loop"):
            res["agent"] = scenario_agent(plan, tmp)
        with monitor.scenario("many prefixes"):
            res["many"] = scenario_many(plan, tmp)
        with monitor.scenario("context switching"):
            res["switch"] = scenario_switch(plan, tmp, tok)
        with monitor.scenario("shared store on Redis"):
            res["redis"] = scenario_redis(plan)
        res["storage"] = storage_rows(tmp, plan.sizes, tmp / "agent-store")
        res["load"] = monitor.by_scenario
        elapsed = time.perf_counter() - start
        res["elapsed_s"], res["quick"] = elapsed, args.quick
        (out / "results.json").write_text(json.dumps(res, indent=1))
        text, _ = report(res, plan, elapsed, args.quick)
    write_results(out / "results.md", text)
    plot(res["ttft"], out / "ttft.png")
    print()
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'ttft.png'} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
