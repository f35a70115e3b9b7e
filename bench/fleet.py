"""A fleet of agents on one shared Redis store, against the same fleet on private disk stores.

N worker processes (default 8) run random agent traffic for a fixed time: each picks one of 10
recipes (a system prompt and tool schemas of ~500 to ~1,800 tokens, pinned once by a prewarm
step into one DiskStore), appends a user turn, calls ``chat`` (streamed, a few tokens), keeps
the conversation for 2 to 5 turns, then starts over on another recipe. Run twice:

- **redis**: every worker opens ``redis://...?local=<its own dir>`` (a TieredStore: the shared
  Redis plus a local tier of its own, as on separate hosts, empty at the start); Redis starts
  with a copy of the prewarmed store, and what any worker autosaves every other one restores;
- **disk**: every worker has a private DiskStore, a copy of one prewarmed store.

Per store kind it reports throughput (calls/min, all workers), time to first token (from the
call to the first streamed content or tool-call chunk: restore, suffix prefill, first token),
hit rate (prompt tokens not prefilled / prompt tokens; and the share restored from the store),
and index overhead per call: the time spent in ``Catalog.sync`` (bringing the index up to date
with the store) and ``RadixIndex.match`` during the call, timed by wrapping them in the worker
(replies prefilled ahead on the ``prefixcache-ahead`` thread are not counted). Prints both side
by side, writes its section of bench/results.md and bench/fleet.png. Starts and stops its own
redis-server; every store lives in a temporary directory (``--prewarmed DIR`` keeps the
prewarmed store, so that a later run with the same recipes skips their prefill).

    nice -n 10 .venv/bin/python bench/fleet.py [--workers 8] [--minutes 10] [--kinds redis disk]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
N_CTX = 4096
MAX_TOKENS = 8
RECIPES = 10
AGENTS_PER_WORKER = 2  # routed traffic: agents served by the fleet, per worker
MARK_BEGIN = "<!-- fleet: written by bench/fleet.py -->"
MARK_END = "<!-- /fleet -->"
TOPICS = [
    "orders",
    "refunds",
    "shipping",
    "accounts",
    "billing",
    "inventory",
    "returns",
    "warranty",
    "subscriptions",
    "gift cards",
]
QUESTIONS = [
    "Where is my order {n}?",
    "Can I change the address on order {n}?",
    "How long does a refund for order {n} take?",
    "Which items of order {n} are still missing?",
    "Please cancel order {n}.",
    "Why was I charged twice for order {n}?",
    "Can I return one book from order {n}?",
    "Is order {n} covered by the warranty?",
]


# recipes ------------------------------------------------------------------------------------


def tool(topic: str, verb: str, i: int) -> dict[str, Any]:
    name = f"{verb}_{topic.replace(' ', '_')}"
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{verb.capitalize()} a record of the {topic} desk (version {i}).",
            "parameters": {
                "type": "object",
                "properties": {
                    "record_id": {"type": "string", "description": f"The {topic} record id."},
                    "email": {"type": "string", "description": "The customer's email address."},
                    "note": {"type": "string", "description": "Free text for the agent log."},
                },
                "required": ["record_id"],
            },
        },
    }


def write_recipes(folder: Path) -> list[Path]:
    """Ten recipes: a system prompt of ~200 to ~1,300 tokens and 2 to 4 tools each (~500 to
    ~1,800 tokens of prefix in all)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, topic in enumerate(TOPICS):
        target_chars = (200 + i * 120) * 4
        lines = [f"You are the {topic} assistant of Bramble Books. Follow these rules exactly."]
        k = 0
        while len("\n".join(lines)) < target_chars:
            k += 1
            lines.append(
                f"Rule {k} ({topic}): requests of kind {k % 7} are answered within {k % 5 + 1} "
                f"hours; escalate kind {k % 3} to a human after {k % 4 + 2} failed attempts."
            )
        verbs = ("get", "update", "close", "escalate")[: 2 + i % 3]
        tools = [tool(topic, verb, i) for verb in verbs]
        recipe = {
            "name": f"fleet-{i}",
            "n_ctx": N_CTX,
            "pinned": True,
            "tools": tools,
            "prefix": [{"system": "\n".join(lines)}],
        }
        path = folder / f"fleet-{i}.yaml"
        path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
        paths.append(path)
    return paths


# roles, each in its own process -------------------------------------------------------------


def role_prewarm(store: str, recipes: str) -> dict[str, Any]:
    from prefixcache import PrefixCache
    from prefixcache.prewarm import prewarm_all
    from prefixcache.recipes import load_recipes

    cache = PrefixCache.open(store=store, n_ctx=N_CTX)
    try:
        results = prewarm_all(cache, load_recipes([recipes]))
    finally:
        cache.close()
    return {"tokens": [r.n_tokens for r in results], "seconds": sum(r.seconds for r in results)}


def role_seed(source: str, url: str) -> dict[str, Any]:
    """Copy a prewarmed DiskStore (segments, pins, calibration) into a Redis store."""
    from prefixcache.store import open_store
    from prefixcache.store.disk import DiskStore

    src = DiskStore(source)
    dst = open_store(url + "?local=none")
    try:
        segs = sorted(src.segments(), key=lambda s: s.start)  # parents first
        for seg in segs:
            buf = bytearray(seg.nbytes)
            src.read_kv(seg, memoryview(buf))
            dst.put(seg, bytes(buf))
        for pin in src.pins():
            dst.set_pin(pin)
        for fp in {s.fingerprint for s in segs}:
            for name in (f"fingerprint:{fp}", f"calibration:{fp}"):
                doc = src.get_doc(name)
                if doc is not None:
                    dst.set_doc(name, doc)
    finally:
        src.close()
        dst.close()
    return {"segments": len(segs), "bytes": sum(s.nbytes for s in segs)}


def instrument(cache: Any) -> dict[str, float]:
    """Time the index path of each call: Catalog.sync and RadixIndex.match (not the ahead
    thread's). Wraps them in this process only; no library code changes."""
    from prefixcache.radix import RadixIndex

    box = {"s": 0.0, "n": 0.0}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name == "prefixcache-ahead":
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                box["s"] += time.perf_counter() - t0
                box["n"] += 1

        return wrapper

    cache.catalog.sync = timed(cache.catalog.sync)
    RadixIndex.match = timed(RadixIndex.match)  # type: ignore[method-assign]
    return box


def first_chunk(chunks: Any) -> tuple[float, float, str]:
    """(time to the first content or tool-call chunk, total time, text) of a stream."""
    t0 = time.perf_counter()
    ttft = 0.0
    text = ""
    for chunk in chunks:
        choices = chunk.get("choices") or [{}]
        delta = choices[0].get("delta") or {}
        if (delta.get("content") or delta.get("tool_calls")) and not ttft:
            ttft = time.perf_counter() - t0
        text += delta.get("content") or ""
    total = time.perf_counter() - t0
    return ttft or total, total, text


class Agents:
    """Where each call's conversation comes from.

    ``sticky``: every worker keeps one conversation of its own. ``routed``: the fleet serves
    :data:`AGENTS_PER_WORKER` agents per worker, and each call goes to whichever agent is free,
    so an agent's next turn usually lands on another worker (a load balancer without session
    affinity). Routed conversations live in one JSON file per agent, taken under a file lock.
    """

    def __init__(self, folder: Path, routing: str, worker: str):
        self.folder = folder
        self.routing = routing
        self.own: dict[str, Any] = {"recipe": "", "conv": [], "turns_left": 0, "worker": worker}
        folder.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def take(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.routing == "sticky":
            yield self.own
            return
        names = [f"agent-{i}" for i in range(self.count())]
        for name in rng.sample(names, len(names)):
            with open(self.folder / f"{name}.lock", "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker is serving this agent
                path = self.folder / f"{name}.json"
                state = json.loads(path.read_text()) if path.exists() else {**self.own}
                yield state
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(path)
                return
        raise RuntimeError("every agent is busy (more workers than agents?)")

    def count(self) -> int:
        workers = len(list(self.folder.parent.glob("worker-*.json.ready")))
        return AGENTS_PER_WORKER * max(1, workers)


def role_worker(
    store: str, recipes: str, seconds: float, seed: int, out: str, threads: int, routing: str
) -> None:
    from prefixcache import PrefixCache
    from prefixcache.recipes import load_recipes

    rng = random.Random(seed)
    worker = Path(out).stem
    loaded = load_recipes([recipes])
    cache = PrefixCache.open(store=store, n_ctx=N_CTX, n_threads=threads)
    index = instrument(cache)
    Path(out + ".ready").write_text("ok")
    go = Path(out).parent / "go"
    while not go.exists():
        time.sleep(0.05)
    deadline = float(go.read_text()) + seconds
    while time.time() < deadline - seconds:
        time.sleep(0.01)
    cpu0 = time.process_time()
    rows = []
    agents = Agents(Path(out).parent / "agents", routing, worker)
    by_name = {r.name: r for r in loaded}
    while time.time() < deadline:
        with agents.take(rng) as agent:
            if agent["turns_left"] == 0:
                recipe = rng.choice(loaded)
                agent.update(recipe=recipe.name, turns_left=rng.randint(2, 5), worker=worker)
                agent["conv"] = [dict(m) for m in recipe.messages]
            recipe = by_name[agent["recipe"]]
            conv = agent["conv"]
            moved = agent["worker"] != worker
            question = rng.choice(QUESTIONS).format(n=f"BB-{rng.randint(10000, 99999)}")
            conv.append({"role": "user", "content": question})
            before_s, before_n = index["s"], index["n"]
            t_start = time.time()
            chunks = cache.chat(
                conv,
                tools=list(recipe.tools) or None,
                stream=True,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            ttft, total, text = first_chunk(chunks)
            prepared = getattr(chunks, "prepared", None)
            conv.append({"role": "assistant", "content": text})
            agent["turns_left"] -= 1
            agent["worker"] = worker
        rows.append(
            {
                "t": t_start,
                "recipe": recipe.name,
                "moved": moved,
                "ttft_s": ttft,
                "total_s": total,
                "prompt": prepared.prompt_tokens if prepared else 0,
                "reused": prepared.reused_tokens if prepared else 0,
                "restored": prepared.restored_tokens if prepared else 0,
                "restore_s": prepared.restore_seconds if prepared else 0.0,
                "index_s": index["s"] - before_s,
                "index_calls": index["n"] - before_n,
            }
        )
    cpu = time.process_time() - cpu0
    stats = cache.stats()
    store_stats: dict[str, Any] = getattr(cache.store, "stats", dict)()
    cache.close()
    Path(out).write_text(
        json.dumps({"rows": rows, "stats": stats, "store_stats": store_stats, "cpu_s": cpu})
    )


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return out


# the benchmark ------------------------------------------------------------------------------


def run_role(*args: str) -> dict[str, Any]:
    out = finish(spawn(*args), args[0])
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_fleet(kind: str, stores: list[str], recipes: Path, work: Path, args: Any) -> dict[str, Any]:
    """Start the workers, wait until all have loaded the model, let them run, collect rows."""
    run_dir = work / f"run-{kind}"
    run_dir.mkdir()
    procs = []
    outs = []
    for i, store in enumerate(stores):
        out = run_dir / f"worker-{i}.json"
        outs.append(out)
        procs.append(
            spawn(
                "worker",
                store,
                str(recipes),
                str(args.minutes * 60),
                str(args.seed * 1000 + i),
                str(out),
                str(args.threads),
                args.routing,
            )
        )
    deadline = time.monotonic() + 600
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        for p in procs:
            if p.poll() is not None:
                finish(p, f"a {kind} worker")
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not load the model within 10 minutes")
        time.sleep(0.2)
    start = time.time() + 1.0
    (run_dir / "go").write_text(str(start))
    while time.time() < start:
        time.sleep(0.01)
    busy0 = busy_seconds()
    for i, p in enumerate(procs):
        finish(p, f"{kind} worker {i}")
    busy = busy_seconds() - busy0
    elapsed = time.time() - start
    results = [json.loads(o.read_text()) for o in outs]
    summary = summarise(kind, results, args)
    mine = sum(res["cpu_s"] for res in results)
    summary["fleet_cores"] = mine / elapsed
    summary["other_cores"] = max(0.0, busy - mine) / elapsed
    return summary


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarise(kind: str, results: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    rows = [r for res in results for r in res["rows"]]
    prompt = sum(r["prompt"] for r in rows) or 1
    ttft = [r["ttft_s"] for r in rows]
    index = [r["index_s"] for r in rows]
    errors = sum(res["stats"].get("store_errors", 0) for res in results)
    return {
        "kind": kind,
        "workers": len(results),
        "minutes": args.minutes,
        "calls": len(rows),
        "calls_per_min": len(rows) / args.minutes,
        "moved_share": sum(bool(r.get("moved")) for r in rows) / max(1, len(rows)),
        "per_worker_calls": [len(res["rows"]) for res in results],
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
        "ttft_p95_ms": 1e3 * pct(ttft, 0.95),
        "hit_rate": sum(r["reused"] for r in rows) / prompt,
        "restored_share": sum(r["restored"] for r in rows) / prompt,
        "prompt_tokens_mean": prompt / max(1, len(rows)),
        "index_mean_ms": 1e3 * statistics.fmean(index) if index else float("nan"),
        "index_p50_ms": 1e3 * pct(index, 0.5),
        "index_p95_ms": 1e3 * pct(index, 0.95),
        "index_max_ms": 1e3 * max(index, default=float("nan")),
        "restore_mean_ms": 1e3 * statistics.fmean(r["restore_s"] for r in rows) if rows else 0.0,
        "store_errors": errors,
        "segments_saved": sum(res["stats"].get("segments_saved", 0) for res in results),
    }


def bench(args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="prefixcache-fleet-") as tmp:
        work = Path(tmp)
        recipes = work / "recipes"
        write_recipes(recipes)
        # The recipes are pinned once, into one DiskStore (skipped when --prewarmed holds them
        # already); the Redis store and every private disk store start as copies of it.
        prewarmed = Path(args.prewarmed) if args.prewarmed else work / "prewarmed"
        out["prewarm"] = run_role("prewarm", str(prewarmed), str(recipes))
        for kind in args.kinds:
            t0 = time.perf_counter()
            if kind == "redis":
                from redis_ttft import start_redis

                proc, port = start_redis(work)
                try:
                    base = f"redis://127.0.0.1:{port}/0"
                    out["seed"] = run_role("seed", str(prewarmed), base)
                    stores = [f"{base}?local={work / f'tier-{i}'}" for i in range(args.workers)]
                    out["runs"].append(run_fleet(kind, stores, recipes, work, args))
                finally:
                    proc.kill()
                    proc.wait()
            else:
                stores = []
                for i in range(args.workers):
                    shutil.copytree(prewarmed, work / f"disk-{i}")
                    stores.append(str(work / f"disk-{i}"))
                out["runs"].append(run_fleet(kind, stores, recipes, work, args))
            out["runs"][-1]["wall_s"] = time.perf_counter() - t0
            print(f"{kind}: done in {out['runs'][-1]['wall_s'] / 60:.1f} min", file=sys.stderr)
    out["recipe_tokens"] = out["prewarm"]["tokens"]
    return out


# report -------------------------------------------------------------------------------------

LINES = [
    ("calls (all workers)", "calls", "{:.0f}"),
    ("throughput (calls/min)", "calls_per_min", "{:.1f}"),
    ("TTFT p50", "ttft_p50_ms", "{:.0f} ms"),
    ("TTFT p95", "ttft_p95_ms", "{:.0f} ms"),
    ("hit rate (reused / prompt tokens)", "hit_rate", "{:.1%}"),
    ("of the prompt, restored from the store", "restored_share", "{:.1%}"),
    ("prompt tokens per call (mean)", "prompt_tokens_mean", "{:.0f}"),
    ("turns served by another worker than the last", "moved_share", "{:.0%}"),
    ("index overhead per call, mean", "index_mean_ms", "{:.2f} ms"),
    ("index overhead per call, p50", "index_p50_ms", "{:.2f} ms"),
    ("index overhead per call, p95", "index_p95_ms", "{:.2f} ms"),
    ("index overhead per call, max", "index_max_ms", "{:.1f} ms"),
    ("restore per call (mean)", "restore_mean_ms", "{:.1f} ms"),
    ("segments autosaved", "segments_saved", "{:.0f}"),
    ("store errors", "store_errors", "{:.0f}"),
    ("CPU cores used by the workers", "fleet_cores", "{:.2f}"),
    ("CPU cores used by other processes", "other_cores", "{:.2f}"),
]
ROUTING = {
    "sticky": "each worker keeps its own conversation (routing `sticky`).",
    "routed": f"routing `routed`: the fleet serves {AGENTS_PER_WORKER} agents per worker and "
    "each call goes to whichever agent is free, so an agent's next turn usually lands on "
    "another worker (a load balancer without session affinity).",
}
LABEL = {"redis": "shared Redis + local tiers", "disk": "private disk stores"}


def table(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    head = ["", *(LABEL.get(r["kind"], r["kind"]) for r in runs)]
    body = [[name, *(fmt.format(r[key]) for r in runs)] for name, key, fmt in LINES]
    widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return lines


def section(res: dict[str, Any], command: str) -> str:
    runs = res["runs"]
    workers = runs[0]["workers"]
    minutes = runs[0]["minutes"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [
        MARK_BEGIN,
        f"## Fleet: {workers} agents on one shared Redis vs private disk stores "
        "(`bench/fleet.py`, run on its own; not regenerated by `bench/run.py`)",
        "",
        f"Run {when} with `{command}`: {workers} worker processes, {minutes:g} min of traffic "
        f"per store kind (the default is 10 min; this run used {minutes:g}). Each worker "
        f"(SmolLM2-135M Q4_1, n_ctx {N_CTX}, {res.get('threads', 1)} thread) picks one of "
        f"{RECIPES} pinned recipes (prefixes of {min(res['recipe_tokens'] or [0])} to "
        f"{max(res['recipe_tokens'] or [0])} tokens: system prompt + tool schemas), keeps the "
        "conversation for 2 to 5 user turns, then starts over; "
        + ROUTING[res.get("routing", "sticky")]
        + " Each call streams "
        f"{MAX_TOKENS} tokens (greedy). TTFT: call to first streamed content/tool-call chunk. "
        "Hit rate: prompt tokens not prefilled (live KV or restored) / prompt tokens. Index "
        "overhead: time in `Catalog.sync` + `RadixIndex.match` during the call. Redis: each "
        "worker has its own local tier (as on separate hosts, empty at the start) and Redis starts "
        "with a copy of the prewarmed store (the recipes pinned once); disk: each worker a "
        "private copy of that store.",
        "",
        *table(res),
        "",
        "![fleet](fleet.png)",
        "",
        "Calls per worker: "
        + "; ".join(f"{r['kind']} {r['per_worker_calls']}" for r in runs)
        + ". Every worker is CPU-bound, so on a small machine throughput and TTFT measure "
        "mostly the contention (the last two rows say what else ran), and the comparison "
        "between the two columns (same traffic seed) matters more than absolute values.",
        "",
        MARK_END,
    ]
    return "\n".join(md)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (between the markers), or append it."""
    old = path.read_text() if path.exists() else ""
    if MARK_BEGIN in old and MARK_END in old:
        head, _, rest = old.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END)
        old = head + text + tail
    else:
        old = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(old)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    names = [LABEL.get(r["kind"], r["kind"]) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    axes[0].bar(names, [r["calls_per_min"] for r in runs], color=["C0", "C1"][: len(runs)])
    axes[0].set_title("throughput (calls/min, all workers)")
    x = range(len(runs))
    panels = (("ttft", "time to first token (ms)"), ("index", "index overhead per call (ms)"))
    for ax, (key, title) in zip(axes[1:], panels, strict=True):
        ax.bar([i - 0.2 for i in x], [r[f"{key}_p50_ms"] for r in runs], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [r[f"{key}_p95_ms"] for r in runs], 0.4, label="p95")
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    w, m = runs[0]["workers"], runs[0]["minutes"]
    fig.suptitle(f"{w} agents, {m:g} min per store kind, SmolLM2-135M on 2 shared CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic per store kind")
    parser.add_argument("--kinds", nargs="+", default=["redis", "disk"], choices=["redis", "disk"])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--routing",
        choices=["routed", "sticky"],
        default="routed",
        help="routed: each call goes to a free agent, so conversations move between workers "
        "(no session affinity); sticky: each worker keeps its own conversation",
    )
    parser.add_argument("--out", default=str(HERE), help="folder for results.md and fleet.png")
    parser.add_argument("--json", metavar="FILE", help="also write the raw summary here")
    parser.add_argument(
        "--prewarmed",
        metavar="DIR",
        help="a DiskStore to pin the recipes into and keep (reused: a later run skips the prefill)",
    )
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, rest = args.role[0], args.role[1:]
        if role == "prewarm":
            print(json.dumps(role_prewarm(rest[0], rest[1])))
        elif role == "seed":
            print(json.dumps(role_seed(rest[0], rest[1])))
        else:
            role_worker(
                rest[0], rest[1], float(rest[2]), int(rest[3]), rest[4], int(rest[5]), rest[6]
            )
        return
    if args.workers < 1 or args.minutes <= 0:
        raise SystemExit("--workers must be at least 1 and --minutes above 0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.path.insert(0, str(HERE))
    res = bench(args)
    res["threads"] = args.threads
    res["routing"] = args.routing
    niceness = os.nice(0)
    command = (f"nice -n {niceness} " if niceness else "") + ".venv/bin/python bench/fleet.py"
    command += f" --workers {args.workers} --minutes {args.minutes:g}"
    if args.routing != "routed":
        command += f" --routing {args.routing}"
    if args.kinds != ["redis", "disk"]:
        command += " --kinds " + " ".join(args.kinds)
    print("\n".join(table(res)))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    out = Path(args.out)
    write_section(out / "results.md", section(res, command.strip()))
    plot(res, out / "fleet.png")
    print(f"wrote {out / 'results.md'} (its fleet section) and {out / 'fleet.png'}")


if __name__ == "__main__":
    main()
