"""The ``prefixcache`` command on the real model: prewarm → status → chat → edit → re-prewarm.

Commands run in-process through typer's CliRunner (the same code path as the console script);
stores are temporary directories given through ``PREFIXCACHE_DIR``.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_recipes import BROKEN, BROKEN_CASES
from typer.testing import CliRunner, Result

from prefixcache.cli import app

KV_BYTES_PER_TOKEN = 23_054  # SmolLM2-135M, f16 K and V; checked loosely below

Run = Callable[..., Result]


@pytest.fixture
def run(store: Path) -> Run:
    runner = CliRunner()

    def invoke(*args: str | Path, code: int = 0, input: str | None = None) -> Result:
        result = runner.invoke(
            app,
            ["--n-ctx", "2048", *map(str, args)],
            env={"PREFIXCACHE_DIR": str(store), "COLUMNS": "120"},
            input=input,
        )
        assert result.exit_code == code, (
            f"prefixcache {' '.join(map(str, args))} exited {result.exit_code}, not {code}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
        )
        assert "Traceback" not in result.output
        return result

    return invoke


def numbered_lines(topic: str, n: int) -> str:
    return "".join(f"{topic} note {i}: the value of item {i} is {i * 7 % 13}.\n" for i in range(n))


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    """A recipe over two included files, long enough (> 1,100 tokens) for several segments."""
    folder = tmp_path / "recipes"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "a.txt").write_text(numbered_lines("alpha", 60))
    (folder / "docs" / "b.txt").write_text(numbered_lines("beta", 30))
    (folder / "agent.yaml").write_text(
        textwrap.dedent(
            """\
            name: agent
            n_ctx: 2048
            prefix:
              - system: You answer questions about the notes below, briefly.
              - include:
                  paths: [docs/*.txt]
                  header: "The notes:"
            """
        )
    )
    return folder


def prewarm_json(run: Run, *paths: Path) -> dict[str, dict[str, Any]]:
    out = run("prewarm", *paths, "--json").stdout
    return {r["recipe"]: r for r in json.loads(out)}


def test_prewarm_status_chat_and_edit(
    run: Run, recipe_dir: Path, cold_reply: Callable[..., str]
) -> None:
    first = prewarm_json(run, recipe_dir)["agent"]
    n = first["n_tokens"]
    assert n > 1100, "the recipe must span more than one 1024-token segment"
    assert first["evaluated_tokens"] == n and not first["skipped"]
    assert first["new_segments"] >= 2
    assert first["new_bytes"] == pytest.approx(n * KV_BYTES_PER_TOKEN, rel=0.01)

    again = prewarm_json(run, recipe_dir)["agent"]
    assert again["skipped"] and again["evaluated_tokens"] == 0

    status = json.loads(run("status", "--json").stdout)
    (row,) = status["pins"]
    assert (row["name"], row["tokens"], row["pinned"], row["stored"]) == ("agent", n, True, True)
    assert row["bytes"] == first["new_bytes"] == status["pinned_bytes"]
    table = run("status").stdout
    assert "agent" in table and str(n) in table and "SmolLM2" in table

    question = "What is the value of item 3 in the alpha notes?"
    chat = run("chat", recipe_dir / "agent.yaml", "-m", question, "--max-tokens", "16").stdout
    cached = int(re.search(r"cached (\d+) tokens", chat).group(1))
    assert cached >= n
    reply = chat.split("agent> ", 1)[1].split("\ncached ", 1)[0]
    from prefixcache.recipes import load_recipe

    messages = [*load_recipe(recipe_dir / "agent.yaml").messages]
    expected = cold_reply([*messages, {"role": "user", "content": question}], max_tokens=16)
    assert reply == expected

    # Edit the second file: only the segments from the change on are evaluated again.
    b = recipe_dir / "docs" / "b.txt"
    b.write_text(b.read_text().replace("beta note 29", "beta note twenty-nine"))
    edited = prewarm_json(run, recipe_dir)["agent"]
    assert not edited["skipped"]
    assert edited["reused_tokens"] >= 1024
    assert 0 < edited["evaluated_tokens"] < edited["n_tokens"] - 1000

    tree = run("tree").stdout
    assert "agent" in tree and "[0, " in tree and "[1024, " in tree


@pytest.mark.parametrize(
    ("filename", "line", "fragment", "error_file"),
    BROKEN_CASES,
    ids=[case[0] for case in BROKEN_CASES],
)
def test_broken_recipes_give_one_red_line(
    run: Run, filename: str, line: int, fragment: str, error_file: str | None
) -> None:
    result = run("prewarm", BROKEN / filename, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {BROKEN / (error_file or filename)}:{line}: ")
    assert fragment in lines[0]
    assert result.stdout.strip() == ""


def small_recipe(folder: Path, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nprefix:\n  - system: {json.dumps(numbered_lines(name, 12))}\n")
    return path


def test_verify_finds_a_flipped_byte_and_fix_removes_it(
    run: Run, tmp_path: Path, store: Path
) -> None:
    recipe = small_recipe(tmp_path)
    prewarm_json(run, recipe)
    assert "0 corrupt" in run("verify").stdout
    value_file = max(store.rglob("*.val"), key=lambda p: p.stat().st_size)
    data = bytearray(value_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    value_file.write_bytes(data)
    result = run("verify", code=1)
    assert "corrupt" in result.stdout and "checksum mismatch" in result.stdout
    assert "verify --fix" in result.stderr
    assert "removed" in run("verify", "--fix").stdout
    assert "0 segments checked" in run("verify").stdout
    # The pin's record outlives its bytes; prewarm stores the prefix again.
    assert prewarm_json(run, recipe)["tiny"]["evaluated_tokens"] > 0


def test_unpin_pin_gc_and_rm(run: Run, tmp_path: Path) -> None:
    keep, drop = small_recipe(tmp_path, "keep"), small_recipe(tmp_path, "drop")
    prewarm_json(run, keep, drop)

    def pins() -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in json.loads(run("status", "--json").stdout)["pins"]}

    run("unpin", "drop")
    assert not pins()["drop"]["pinned"] and pins()["keep"]["pinned"]
    # A tiny quota evicts what is unpinned and never what is pinned.
    run("--quota-gb", "0.000001", "gc")
    after = pins()
    assert not after["drop"]["stored"] and after["keep"]["stored"]
    run("pin", "drop", code=1)  # its bytes are gone: nothing to pin

    run("unpin", "keep")
    run("pin", "keep", "--ttl", "1h")
    row = pins()["keep"]
    assert row["pinned"] and 3500 < row["ttl_left_s"] <= 3600
    assert "removed keep" in run("rm", "keep").stdout
    status = json.loads(run("status", "--json").stdout)
    assert "keep" not in {p["name"] for p in status["pins"]} and status["bytes"] == 0
    assert run("rm", "keep", code=1).stderr.startswith("error: no stored prefix called 'keep'")


def test_errors_are_one_line_without_traceback(run: Run, tmp_path: Path) -> None:
    result = run("chat", tmp_path / "nope.yaml", code=1)
    assert result.stderr.count("\n") == 1 and "no recipe" in result.stderr
    result = run("prewarm", tmp_path, code=1)
    assert "holds no *.yaml" in result.stderr
    result = run("--model", tmp_path / "missing.gguf", "prewarm", small_recipe(tmp_path), code=1)
    assert result.stderr.count("\n") == 1 and "missing.gguf" in result.stderr


@pytest.fixture
def server_logging() -> Iterator[None]:
    """``serve`` swaps the prefixcache logger's handlers for plain ones: put them back after."""
    logger = logging.getLogger("prefixcache")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.mark.parametrize(
    "include",
    [lambda secret: str(secret), lambda secret: "../private/secret.txt", "symlink"],
    ids=["absolute", "dotdot", "symlink"],
)
def test_serve_refuses_includes_outside_the_recipe_folder_that_prewarm_reads(
    run: Run, tmp_path: Path, include: Any, server_logging: None
) -> None:
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("The vault code is 4471.\n")
    folder = tmp_path / "recipes"
    folder.mkdir()
    if include == "symlink":
        (folder / "notes.txt").symlink_to(secret)
        path = "notes.txt"
    else:
        path = include(secret)
    recipe = folder / "leak.yaml"
    recipe.write_text(f"name: leak\nprefix:\n  - include:\n      paths: [{json.dumps(path)}]\n")

    result = run("serve", "--recipes", folder, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {recipe.resolve()}:4: include: ")
    assert "outside the recipe root" in lines[0] and "4471" not in lines[0]

    # The CLI's own commands trust the recipes they are given.
    assert prewarm_json(run, folder)["leak"]["n_tokens"] > 0


def test_serve_needs_a_readable_api_key_file(run: Run, tmp_path: Path) -> None:
    result = run("serve", "--api-key-file", tmp_path / "nope.txt", code=1)
    assert result.stderr.count("\n") == 1 and "nope.txt" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# no keys yet\n\n")
    assert "holds no key" in run("serve", "--api-key-file", empty, code=1).stderr
