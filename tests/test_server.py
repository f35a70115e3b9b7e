"""``prefixcache serve`` on loopback, driven by the official ``openai`` client.

Most tests start the real server (a subprocess running the console command on the real SmolLM2
model and a temporary store) and talks HTTP to it, as an agent framework would. Reload tests that
need to look inside (which models are loaded, which pins are left) drive a :class:`Server` in
process, on the same real model and store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import openai
import pytest
from conftest import N_CTX, SYSTEM, TOOL

from prefixcache.errors import RecipeError
from prefixcache.prewarm import prewarm
from prefixcache.recipes import load_recipe
from prefixcache.server import APIError, ModelWorker, Server, ServerConfig
from prefixcache.server.assemble import Assembler
from prefixcache.template import ChatTemplate

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def write_recipe(folder: Path, system: str) -> Path:
    """A recipe pinning ``system`` with TOOL (written as JSON, which is YAML too)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shop.yaml"
    path.write_text(
        f"name: shop\nn_ctx: {N_CTX}\ntools: [{json.dumps(TOOL)}]\n"
        f"prefix:\n  - system: {json.dumps(system)}\n"
    )
    return path


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, api_key: str = "none", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/health", timeout=10).json())

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"server exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.logs()}"
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    write_recipe(folder, str(SYSTEM["content"]))
    return folder


@pytest.fixture
def serve(store: Path, recipes: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None, store_url: str = "") -> Served:
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        cmd = [sys.executable, "-m", "prefixcache", "--store", store_url or str(store)]
        cmd += ["--n-ctx", str(N_CTX), "serve", "--recipes", str(recipes), "--port", str(port)]
        cmd += args
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        served = Served(f"http://127.0.0.1:{port}", proc, log)
        started.append(served)

        def up() -> bool:
            try:
                return httpx.get(served.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        served.wait_for("the server to listen", up, timeout=180)
        return served

    yield start
    for served in started:
        served.proc.terminate()
        try:
            served.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


def ask(question: str, system: str = str(SYSTEM["content"])) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def cold_with_tool(cold_llm: llama_cpp.Llama, cold_reply: Callable[..., str]) -> Callable[..., str]:
    """The cold reply to a conversation with TOOL: SmolLM2's template ignores tools, so they go
    into a system message, as the server does (and as ``ChatTemplate.messages_for`` documents)."""
    template = ChatTemplate(cold_llm)

    def reply(messages: list[dict[str, Any]], max_tokens: int = 24) -> str:
        folded, _ = template.messages_for(messages, [TOOL])
        return cold_reply(folded, max_tokens=max_tokens)

    return reply


def cold_completion(cold_llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> str:
    cold_llm.reset()
    out = cold_llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    return str(out["choices"][0]["text"])


def test_first_request_after_start_restores_the_recipe_and_matches_cold(serve, cold_with_tool):
    served = serve()
    client = served.client()
    messages = ask("Do you cut timber to size?")
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[TOOL], max_tokens=24, temperature=0
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens > 100
    assert reply.model == MODEL_ID
    assert reply.choices[0].message.content == cold_with_tool(messages)

    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=ask("Are you open on Sundays?"),
            tools=[TOOL],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == cold_with_tool(ask("Are you open on Sundays?"))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 100


def test_completions_models_health_and_metrics(serve, cold_llm):
    served = serve()
    client = served.client()
    prompt = "The three primary colours are"
    first = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0)
    again = client.completions.create(
        model=MODEL_ID, prompt=prompt + " red,", max_tokens=16, temperature=0
    )
    assert first.choices[0].text == cold_completion(cold_llm, prompt, 16)
    assert again.choices[0].text == cold_completion(cold_llm, prompt + " red,", 16)
    assert again.usage is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1  # type: ignore[union-attr]

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == first.choices[0].text

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID, "shop"]  # the model, then its recipe
    assert served.health()["status"] == "ok"
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    cached = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(f'prefixcache_cached_tokens_total{{model="{MODEL_ID}"}}')
    )
    assert cached >= first.usage.prompt_tokens - 1  # type: ignore[union-attr]
    assert 'prefixcache_requests_total{code="200",path="/v1/completions"} 3.0' in metrics
    assert f'prefixcache_store_bytes{{model="{MODEL_ID}"}}' in metrics
    assert f'prefixcache_store_errors_total{{model="{MODEL_ID}"}} 0.0' in metrics


def test_bad_requests_get_openai_shaped_4xx(serve):
    served = serve()
    client = served.client()
    bad_json = httpx.post(
        served.url + "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ask("Hi"), max_tokens=4)
    assert missing.value.code == "model_not_found"
    assert MODEL_ID in str(missing.value)

    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL_ID, messages=ask("word " * 3000), max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as too_long_stream:
        next(
            iter(
                client.chat.completions.create(
                    model=MODEL_ID, messages=ask("word " * 3000), max_tokens=4, stream=True
                )
            )
        )
    assert too_long_stream.value.code == "context_length_exceeded"

    for bad in ({"messages": []}, {"n": 2}, {"max_tokens": 0}, {"temperature": "hot"}):
        body = {"model": MODEL_ID, "messages": ask("Hi"), **bad}
        answer = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=10)
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["message"]

    # After all that the server still answers.
    ok = client.chat.completions.create(model=MODEL_ID, messages=ask("Hi"), max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_a_burst_beyond_the_queue_gets_429_and_the_rest_succeed(serve):
    served = serve("--max-queue", "1")
    client = served.client()
    outcomes: list[Any] = []

    def request() -> None:
        try:
            out = client.completions.create(
                model=MODEL_ID, prompt=COUNTING, max_tokens=120, temperature=0
            )
            outcomes.append(out)
        except openai.RateLimitError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    served_ok = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    assert len(outcomes) == 6
    assert 1 <= len(refused) <= 4 and len(served_ok) >= 2
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.code == "queue_full" for r in refused)
    texts = {o.choices[0].text for o in served_ok}
    assert len(texts) == 1  # the same greedy output, whichever restored or prefilled
    assert served.health()["models"][MODEL_ID]["queued"] == 0


def test_a_client_that_disconnects_mid_stream_frees_the_model(serve):
    served = serve()
    body = {"model": MODEL_ID, "prompt": COUNTING, "max_tokens": 1500, "temperature": 0}
    body["stream"] = True
    url = served.url + "/v1/completions"
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as stream:
        lines = stream.iter_lines()
        got = [line for _, line in zip(range(6), lines, strict=False) if line]
        assert got and got[0].startswith("data: ")
    # Leaving the block closed the connection after a few chunks of 1,500.
    t0 = time.perf_counter()
    reply = served.client(timeout=60).completions.create(
        model=MODEL_ID, prompt="Timber is", max_tokens=4, temperature=0
    )
    assert reply.choices[0].text
    served.wait_for("the stopped stream to be logged", lambda: "client went away" in served.logs())
    # 1,500 tokens take well over 10 s here; the next request did not wait for them.
    assert time.perf_counter() - t0 < 10
    assert served.health()["models"][MODEL_ID]["queued"] == 0


def test_api_keys_keep_tenants_apart(serve):
    served = serve("--api-key", "key-a", "--api-key", "key-b")
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").chat.completions.create(
            model=MODEL_ID, messages=ask("Hi"), max_tokens=4
        )
    assert httpx.get(served.url + "/v1/models", timeout=10).status_code == 401

    def cached(key: str, messages: list[dict[str, str]]) -> int:
        reply = served.client(key).chat.completions.create(
            model=MODEL_ID, messages=messages, tools=[TOOL], max_tokens=8, temperature=0
        )
        return int(reply.usage.prompt_tokens_details.cached_tokens)  # type: ignore[union-attr]

    secret = ask("My order number is 99127 and my postcode is ZX4 8QP; " * 6 + "where is it?")
    first_a = cached("key-a", secret)
    assert first_a > 100  # the recipe is pinned in every tenant's namespace
    second_a = cached("key-a", secret)
    assert second_a > first_a + 60  # tenant A's own autosaved question
    assert cached("key-b", secret) == first_a  # tenant B sees only the recipe's prefix


def test_recipes_reload_on_file_change_and_on_sighup(serve, recipes, cold_with_tool):
    served = serve("--watch-interval", "0.3")
    new_system = "You are the assistant of Pine & Pane, a window shop. " * 8
    write_recipe(recipes, new_system)
    served.wait_for("the reload", lambda: served.health()["recipe_reloads"] >= 1)
    messages = ask("Do you fit windows?", system=new_system)
    reply = served.client().chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[TOOL], max_tokens=16, temperature=0
    )
    assert reply.usage.prompt_tokens_details.cached_tokens > 100  # type: ignore[union-attr]
    assert reply.choices[0].message.content == cold_with_tool(messages, max_tokens=16)

    # A broken recipe is logged and the previous ones keep being served.
    (recipes / "shop.yaml").write_text("name: shop\nprefix: [\n")
    served.wait_for("the failed reload", lambda: "serving the previous recipes" in served.logs())
    assert "shop.yaml:3" in served.logs()  # the recipe error names the file and line
    again = served.client().chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[TOOL], max_tokens=16, temperature=0
    )
    assert again.choices[0].message.content == reply.choices[0].message.content

    os.kill(served.proc.pid, signal.SIGHUP)
    served.wait_for("the SIGHUP reload", lambda: "reload (SIGHUP) failed" in served.logs())
    write_recipe(recipes, new_system)
    os.kill(served.proc.pid, signal.SIGHUP)
    served.wait_for("the SIGHUP reload", lambda: "recipes reloaded (SIGHUP)" in served.logs())


# --- API keys -----------------------------------------------------------------------------------


def test_api_keys_from_a_file_and_the_environment_stay_out_of_ps(serve, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\n\ntok-file-1\n   tok-file-2   \n")
    keys.chmod(0o600)
    served = serve(
        "--api-key-file", str(keys), env={"PREFIXCACHE_API_KEYS": "tok-env-1, tok-env-2"}
    )
    assert b"tok-" not in Path(f"/proc/{served.proc.pid}/cmdline").read_bytes()

    reply = served.client("tok-env-2").completions.create(
        model=MODEL_ID, prompt="Timber is", max_tokens=2, temperature=0
    )
    assert reply.choices[0].text
    models = served.url + "/v1/models"
    for key in ("tok-file-1", "tok-file-2", "tok-env-1"):
        answer = httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200, key
    for header in ("Bearer tok-file", "Bearer tok-file-10", "Bearer # one key a line", "tok-env-1"):
        answer = httpx.get(models, headers={"Authorization": header}, timeout=10)
        assert answer.status_code == 401, header
        assert answer.json()["error"]["code"] == "invalid_api_key"


def test_health_tells_only_liveness_without_a_valid_key(serve):
    served = serve("--api-key", "key-a")
    health = served.url + "/health"
    assert httpx.get(health, timeout=10).json() == {"status": "ok"}
    wrong = httpx.get(health, headers={"Authorization": "Bearer key-b"}, timeout=10)
    assert wrong.status_code == 200 and wrong.json() == {"status": "ok"}
    full = httpx.get(health, headers={"Authorization": "Bearer key-a"}, timeout=10).json()
    assert full["models"] == {MODEL_ID: {"queued": 0}}
    assert full["recipe_reloads"] == 0 and full["uptime_s"] >= 0


# --- /metrics off the event loop ----------------------------------------------------------------


def test_health_answers_while_metrics_waits_for_a_stalled_store(serve, tmp_path):
    from test_redis import RedisServer

    redis = RedisServer(tmp_path / "redis")
    try:
        served = serve(store_url=redis.url(socket_timeout="20"))
        assert redis.proc is not None
        scraped: list[httpx.Response] = []
        scrape = threading.Thread(
            target=lambda: scraped.append(httpx.get(served.url + "/metrics", timeout=60))
        )
        os.kill(redis.proc.pid, signal.SIGSTOP)  # the store stops answering; sockets stay open
        try:
            scrape.start()
            time.sleep(1.5)
            assert scrape.is_alive(), "the scrape should be waiting for the stalled store"
            t0 = time.perf_counter()
            assert httpx.get(served.url + "/health", timeout=5).json()["status"] == "ok"
            assert time.perf_counter() - t0 < 2
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        scrape.join(timeout=60)
        assert scraped and scraped[0].status_code == 200
        assert f'prefixcache_store_bytes{{model="{MODEL_ID}"}}' in scraped[0].text
    finally:
        redis.kill()


# --- recipes confined to their folder -----------------------------------------------------------


def _include_absolute(recipes: Path, secret: Path) -> str:
    return str(secret)


def _include_dotdot(recipes: Path, secret: Path) -> str:
    return f"../{secret.parent.name}/{secret.name}"


def _include_symlink(recipes: Path, secret: Path) -> str:
    (recipes / "notes.txt").symlink_to(secret)
    return "notes.txt"


ESCAPES = [_include_absolute, _include_dotdot, _include_symlink]
ESCAPE_IDS = ["absolute", "dotdot", "symlink"]


def escaping_recipe(tmp_path: Path, escape: Callable[[Path, Path], str]) -> tuple[Path, Path]:
    """A recipe folder whose one recipe includes a file outside it; returns (folder, recipe)."""
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir(parents=True)
    secret.write_text("the database password is hunter2\n")
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "leak.yaml"
    path = escape(folder, secret)
    recipe.write_text(f"name: leak\nprefix:\n  - include:\n      paths: [{json.dumps(path)}]\n")
    return folder, recipe


@pytest.mark.parametrize("escape", ESCAPES, ids=ESCAPE_IDS)
def test_the_server_refuses_includes_outside_the_recipe_folder(tmp_path, store, escape):
    folder, recipe = escaping_recipe(tmp_path, escape)
    server = Server(ServerConfig(recipe_paths=[folder], store=str(store), watch_interval=None))
    with pytest.raises(RecipeError, match="outside the recipe root") as caught:
        server.start()  # refused while loading the recipes, before any model is loaded
    assert (caught.value.path, caught.value.line) == (str(recipe.resolve()), 4)
    assert not server.workers

    # --no-recipes-root, or a root wide enough, lets the server read it (as the CLI always does).
    for config in (
        ServerConfig(recipe_paths=[folder], confine_recipes=False),
        ServerConfig(recipe_paths=[folder], recipes_root=tmp_path),
    ):
        (leak,) = Server(config)._load_recipes()
        assert "hunter2" in leak.messages[0]["content"]


# --- reloads: nothing leaks, nothing is changed under the event loop -----------------------------


def write_named(folder: Path, file: str, name: str, text: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(f"name: {name}\n{extra}prefix:\n  - system: {json.dumps(text)}\n")
    return path


@pytest.fixture
def in_process(store: Path) -> Iterator[Callable[[Path], Server]]:
    """A started :class:`Server` over a recipe folder, in this process; closed at the end."""
    servers: list[Server] = []

    def start(folder: Path) -> Server:
        config = ServerConfig(recipe_paths=[folder], store=str(store), watch_interval=None)
        server = Server(config)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


def pin_names(worker: ModelWorker) -> set[str]:
    return {p.name for p in worker.submit(worker.cache.pins, admit=False).result()}


def test_reload_unpins_deleted_and_renamed_recipes_and_keeps_other_pins(in_process, tmp_path):
    folder = tmp_path / "recipes"
    write_named(folder, "a.yaml", "alpha", "You answer questions about alpha. " * 6)
    write_named(folder, "b.yaml", "beta", "You answer questions about beta. " * 6)
    server = in_process(folder)
    worker = server.workers[MODEL_ID]
    # Pins this server does not answer for: a recipe from another folder, and one made by hand.
    other = write_named(tmp_path / "elsewhere", "c.yaml", "gamma", "About gamma. " * 6)
    worker.submit(lambda: prewarm(worker.cache, load_recipe(other)), admit=False).result()
    manual = [{"role": "system", "content": "Pinned by hand. " * 6}]
    worker.submit(lambda: worker.cache.pin(manual, "manual"), admit=False).result()
    assert pin_names(worker) == {"alpha", "beta", "gamma", "manual"}

    (folder / "b.yaml").unlink()
    write_named(folder, "a.yaml", "alpha-2", "You answer questions about alpha. " * 6)
    assert server.reload("test")
    assert pin_names(worker) == {"alpha-2", "gamma", "manual"}
    assert [r.name for r in worker.recipes] == ["alpha-2"]


def test_reload_unloads_models_no_recipe_uses_and_swaps_the_workers_map(
    in_process, tmp_path, model_path
):
    models = tmp_path / "models"
    models.mkdir()
    (models / "Other.gguf").symlink_to(model_path)  # models are not confined to the recipe folder
    folder = tmp_path / "recipes"
    system = "You answer questions about timber. " * 6
    write_named(folder, "a.yaml", "alpha", system)
    server = in_process(folder)
    before = server.workers
    seen = dict(before)
    old = before[MODEL_ID]

    write_named(folder, "a.yaml", "alpha", system, extra="model: ../models/Other.gguf\n")
    assert server.reload("test")
    # The event loop may be iterating the old map: it was replaced, never changed.
    assert dict(before) == seen and server.workers is not before
    assert list(server.workers) == ["Other"]
    assert old.closed
    with pytest.raises(APIError) as unloaded:
        old.submit(lambda: None)
    assert unloaded.value.status == 404 and "unloaded" in unloaded.value.message
    assert pin_names(server.workers["Other"]) == {"alpha"}


# --- agents cannot wedge the server; model names; OpenAI-shaped recipes (issue 13) -------------


def long_completion(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL_ID, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0}


def test_an_abandoned_request_stops_at_its_next_token(serve):
    served = serve("--max-tokens-cap", "0")
    url = served.url + "/v1/completions"
    # Two long requests: one running (its client gives up after 3 s), one queued behind it
    # (its client gives up after 1 s, while the first still runs).
    gave_up: list[float] = []

    def abandon(timeout: float) -> None:
        t0 = time.perf_counter()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, json=long_completion(1500), timeout=timeout)
        gave_up.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=abandon, args=(t,)) for t in (3, 1)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=30)
    assert len(gave_up) == 2
    t0 = time.perf_counter()
    reply = served.client(timeout=60).completions.create(
        model=MODEL_ID, prompt="Timber is", max_tokens=4, temperature=0
    )
    waited = time.perf_counter() - t0
    assert reply.choices[0].text
    # 1,500 tokens take 30 s or more here (before this fix the next request waited for them).
    assert waited < 5, waited
    served.wait_for("the stopped call to be logged", lambda: "model freed" in served.logs())
    served.wait_for("the dropped call to be logged", lambda: "while queued" in served.logs())
    assert served.health()["models"][MODEL_ID]["queued"] == 0
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    assert 'prefixcache_requests_total{code="499",path="/v1/completions"} 2.0' in metrics


def test_a_non_streamed_reply_is_assembled_from_the_stream_as_before(serve, cold_with_tool):
    served = serve()
    client = served.client()
    messages = ask("Do you sell paint?")
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[TOOL], max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == cold_with_tool(messages, max_tokens=12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.object == "chat.completion" and reply.id.startswith("chat")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.completion_tokens == 12 or reply.choices[0].finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 100


def test_max_tokens_cap_clips_requests_and_bounds_those_without_max_tokens(serve):
    served = serve("--max-tokens-cap", "8")
    client = served.client()
    over = client.completions.create(model=MODEL_ID, prompt=COUNTING, max_tokens=50, temperature=0)
    assert (over.choices[0].finish_reason, over.usage.completion_tokens) == ("length", 8)  # type: ignore[union-attr]
    count = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
    unset = client.chat.completions.create(model=MODEL_ID, messages=count, temperature=0)
    assert unset.choices[0].finish_reason == "length"
    assert unset.usage is not None and unset.usage.completion_tokens == 8
    streamed = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=count,
            temperature=0,
            max_tokens=500,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == unset.choices[0].message.content
    # No max_tokens and a prompt that leaves fewer than 8 tokens of context: the rest of the
    # context, not a context_length_exceeded for a limit the client never set.
    prompt = list(range(1000, 1000 + N_CTX - 3))
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": None, "temperature": 0}
    full = httpx.post(served.url + "/v1/completions", json=body, timeout=120)
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["completion_tokens"] <= 3
    # A limit the client did set is still checked against the context.
    body["max_tokens"] = 8
    too_long = httpx.post(served.url + "/v1/completions", json=body, timeout=120)
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


FEW_SHOT = """
  - role: user
    content: [{type: text, text: "Is SKU A-1 in stock?"}]
  - role: assistant
    content: null
    tool_calls:
      - id: call_1
        type: function
        function: {name: stock_level, arguments: '{"sku": "A-1"}'}
  - {role: tool, tool_call_id: call_1, content: '{"units": 3}'}
  - assistant: Yes, we have 3 units of A-1.
"""


def few_shot_messages(system: str) -> list[dict[str, Any]]:
    """The recipe's prefix as a client's code would send it (parsed from JSON)."""
    call = {"name": "stock_level", "arguments": '{"sku": "A-1"}'}
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": "Is SKU A-1 in stock?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"units": 3}'},
        {"role": "assistant", "content": "Yes, we have 3 units of A-1."},
    ]


def test_a_recipe_name_or_alias_is_a_model_name_and_its_few_shot_calls_restore(
    serve, recipes, cold_llm
):
    system = "You are the stock clerk of Bolt & Board. Answer with the stock level. " * 4
    (recipes / "clerk.yaml").write_text(
        f"name: clerk\naliases: [gpt-4o-mini, acme/clerk:v1]\nn_ctx: {N_CTX}\n"
        f"tools: [{json.dumps(TOOL)}]\nprefix:\n  - system: {json.dumps(system)}\n{FEW_SHOT}"
    )
    served = serve()
    client = served.client()
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {MODEL_ID, "shop", "clerk", "gpt-4o-mini", "acme/clerk:v1"}
    assert listed["gpt-4o-mini"].model_extra == {"root": MODEL_ID, "recipe": "clerk"}
    assert sorted(listed[MODEL_ID].model_extra["recipes"]) == ["clerk", "shop"]  # type: ignore[index]

    pinned = ChatTemplate(cold_llm).prefix_tokens(
        load_recipe(recipes / "clerk.yaml").messages, [TOOL]
    )
    messages = [*few_shot_messages(system), {"role": "user", "content": "And SKU B-7?"}]
    for name in ("gpt-4o-mini", "clerk", "acme/clerk:v1", MODEL_ID):
        reply = client.chat.completions.create(
            model=name, messages=messages, tools=[TOOL], max_tokens=8, temperature=0
        )
        assert reply.model == name  # answered as the name asked for
        assert reply.usage.prompt_tokens_details.cached_tokens >= len(pinned)  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="clerk-2", messages=messages, max_tokens=4)
    assert "gpt-4o-mini" in str(missing.value) and "clerk" in str(missing.value)


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "choices": [choice],
    }


def test_streamed_tool_call_deltas_assemble_into_one_message_by_index():
    def call_delta(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    usage = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
    chunks = [
        chunk({"role": "assistant"}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk(call_delta(0, id="call_a", type="function", function={"name": "f", "arguments": ""})),
        chunk(call_delta(0, function={"arguments": '{"sku": '})),
        chunk(call_delta(1, id="call_b", type="function", function={"name": "g", "arguments": ""})),
        chunk(call_delta(0, function={"arguments": '"A-1"}'})),
        chunk(call_delta(1, function={"arguments": "{}"})),
        chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage},
    ]
    assert Assembler().extend(chunks).result() == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"sku": "A-1"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "g", "arguments": "{}"},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": usage,
    }
    assert chunks[4]["choices"][0]["delta"]["tool_calls"][0]["function"] == {
        "arguments": '{"sku": '
    }
    only_calls = Assembler().extend([chunks[0], *chunks[3:5], chunks[8]]).message()
    assert only_calls["content"] is None and len(only_calls["tool_calls"]) == 1
    assert Assembler().extend([chunks[0], chunk({}, "stop")]).message() == {
        "role": "assistant",
        "content": "",
    }


def test_text_completion_chunks_assemble_with_their_logprobs():
    def piece(text: str, logprob: float | None, finish: str | None = None) -> dict[str, Any]:
        logprobs = None
        if logprob is not None:
            logprobs = {"tokens": [text], "text_offset": [0], "token_logprobs": [logprob]}
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {"id": "cmpl-1", "object": "text_completion", "created": 3, "choices": [choice]}

    result = Assembler().extend([piece(" 13", -0.5), piece(",", -0.1), piece("", None, "length")])
    assert result.result()["choices"] == [
        {
            "text": " 13,",
            "index": 0,
            "logprobs": {
                "tokens": [" 13", ","],
                "text_offset": [0, 0],
                "token_logprobs": [-0.5, -0.1],
            },
            "finish_reason": "length",
        }
    ]
    assert result.result()["object"] == "text_completion"


def test_a_non_streamed_tool_call_is_assembled_from_its_streamed_deltas(serve):
    served = serve()
    client = served.client()
    messages = ask("How many units of SKU A-1 are in stock?")
    kwargs: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": messages,
        "tools": [TOOL],
        "tool_choice": "required",
        "max_tokens": 48,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "stock_level"
    assert "sku" in json.loads(call.function.arguments)
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    pieces = [c.choices[0].delta.tool_calls for c in streamed if c.choices]
    arguments = "".join(d[0].function.arguments or "" for d in pieces if d and d[0].function)
    assert arguments == call.function.arguments
