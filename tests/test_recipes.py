"""Recipe loading: the good paths on real files, and one precise error for each broken recipe."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from prefixcache.errors import PrefixCacheError, RecipeError
from prefixcache.recipes import (
    Recipe,
    check_fits,
    check_token_limits,
    load_recipe,
    load_recipes,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
BROKEN = Path(__file__).resolve().parent / "recipes_broken"
SHIPPED = ROOT / "recipes"

# (file loaded, line of the error, fragment of the message, file the error names if not the same)
BROKEN_CASES: list[tuple[str, int, str, str | None]] = [
    ("bad_yaml_syntax.yaml", 3, "invalid YAML", None),
    ("bad_yaml_indent.yaml", 4, "mapping values are not allowed", None),
    ("top_level_list.yaml", 1, "top level must be a mapping", None),
    ("unknown_top_key.yaml", 2, "unknown top-level key 'prefx' (did you mean 'prefix'?)", None),
    ("unknown_item_key.yaml", 3, "'asistant' (did you mean 'assistant'?)", None),
    ("item_two_keys.yaml", 3, "exactly one key of system, user, assistant, include; got 2", None),
    ("n_ctx_wrong_type.yaml", 2, "n_ctx must be a positive integer, got 'big'", None),
    ("n_ctx_negative.yaml", 1, "n_ctx must be a positive integer, got -512", None),
    ("pinned_wrong_type.yaml", 3, "pinned must be true or false, got 'maybe'", None),
    ("ttl_wrong_type.yaml", 3, "ttl: expected seconds or a duration", None),
    ("ttl_bad_string.yaml", 2, "got '7 days'", None),
    ("tools_wrong_type.yaml", 1, "tools must be a list of tool schemas", None),
    ("tool_without_name.yaml", 7, "tool function needs a name", None),
    ("tool_wrong_type.yaml", 2, "tool type must be 'function', got 'retrieval'", None),
    ("duplicate_tool.yaml", 3, "tool 'lookup_order' is defined twice", None),
    ("include_missing_file.yaml", 6, "no such file 'data/no_such_file.txt'", None),
    ("include_empty_glob.yaml", 3, "pattern 'data/*.nothing' matches no files", None),
    ("include_ignored_glob.yaml", 3, "matches no files that are not ignored", None),
    ("include_folder.yaml", 3, "'data' is a folder; use 'data/**'", None),
    ("include_max_bytes.yaml", 3, "more than max_bytes 10", None),
    ("include_not_utf8.yaml", 2, "'data/latin1.txt' is not UTF-8 text (byte 0xe9", None),
    ("include_binary.yaml", 3, "'data/blob.bin' is a binary file", None),
    ("include_bad_role.yaml", 4, "role must be one of system, user, got 'assistant'", None),
    ("include_unknown_key.yaml", 4, "'max_byte' (did you mean 'max_bytes'?)", None),
    ("include_without_paths.yaml", 3, "include needs paths", None),
    ("message_not_text.yaml", 3, "user must be non-empty text, got a list", None),
    ("empty_prefix.yaml", 2, "prefix is empty", None),
    ("missing_prefix.yaml", 1, "missing required key 'prefix'", None),
    ("duplicate_key.yaml", 4, "duplicate key 'name' (first given on line 1)", None),
    ("bad_name.yaml", 1, "name must be letters, digits", None),
    ("model_missing.yaml", 1, "model: no such file 'models/no-such-model.gguf'", None),
    ("extends_missing.yaml", 2, "extends: no such recipe file 'no_such_parent.yaml'", None),
    ("self_extends.yaml", 1, "a recipe cannot extend itself", None),
    ("cycle_a.yaml", 4, "cycle: cycle_a.yaml -> cycle_b.yaml -> cycle_a.yaml", "cycle_b.yaml"),
    ("cycle_b.yaml", 2, "cycle: cycle_b.yaml -> cycle_a.yaml -> cycle_b.yaml", "cycle_a.yaml"),
    ("broken_parent.yaml", 4, "n_ctx must be a positive integer, got 0", None),
    ("child_of_broken_parent.yaml", 4, "got 0", "broken_parent.yaml"),
]


def write(folder: Path, name: str, text: str) -> Path:
    """Write a dedented file, creating its folder, and return its path."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def word_count(text: str) -> int:
    return len(text.split())


# --- the broken corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "line", "fragment", "error_file"),
    BROKEN_CASES,
    ids=[case[0] for case in BROKEN_CASES],
)
def test_broken_recipe_gives_one_error_with_file_and_line(
    filename: str, line: int, fragment: str, error_file: str | None
) -> None:
    expected_path = BROKEN / (error_file or filename)
    with pytest.raises(RecipeError) as caught:
        load_recipe(BROKEN / filename)
    error = caught.value
    assert error.path == str(expected_path)
    assert error.line == line
    assert str(error).startswith(f"{expected_path}:{line}: ")
    assert fragment in str(error)


def test_broken_corpus_table_covers_every_file() -> None:
    on_disk = {path.name for path in BROKEN.glob("*.yaml")}
    in_table = {case[0] for case in BROKEN_CASES}
    assert on_disk == in_table
    assert len(in_table) >= 18


def test_recipe_errors_are_prefixcache_errors() -> None:
    with pytest.raises(PrefixCacheError):
        load_recipe(BROKEN / "empty_prefix.yaml")


def test_missing_recipe_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_non_utf8_recipe_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"prefix:\n  - system: caf\xe9\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert (caught.value.line, caught.value.reason) == (2, "the recipe is not UTF-8 text")


def test_unknown_key_error_lists_the_expected_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "colour: blue\nprefix: [{system: hi}]\n")
    with pytest.raises(RecipeError, match="expected one of: name, aliases, extends, model"):
        load_recipe(path)


# --- layering ------------------------------------------------------------------------------------


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    """A base recipe with one tool and a child (in a subfolder) that adds a turn and a tool."""
    write(
        tmp_path,
        "base.yaml",
        """
        n_ctx: 4096
        ttl: 1d
        pinned: false
        tools:
          - type: function
            function: {name: search, parameters: {type: object, properties: {}}}
        prefix:
          - system: You are the base.
        """,
    )
    return write(
        tmp_path,
        "agents/child.yaml",
        """
        name: the-child
        extends: ../base.yaml
        ttl: null
        tools:
          - type: function
            function: {name: answer, description: Reply to the user.}
        prefix:
          - user: An example question?
          - assistant: An example answer.
        """,
    )


def test_child_messages_and_tools_come_after_the_parents(layered: Path) -> None:
    child = load_recipe(layered)
    assert child.messages == [
        {"role": "system", "content": "You are the base."},
        {"role": "user", "content": "An example question?"},
        {"role": "assistant", "content": "An example answer."},
    ]
    assert [tool["function"]["name"] for tool in child.tools] == ["search", "answer"]
    assert [recipe.name for recipe in child.chain] == ["base", "the-child"]
    assert child.own_messages == (
        {"role": "user", "content": "An example question?"},
        {"role": "assistant", "content": "An example answer."},
    )


def test_child_inherits_settings_it_does_not_set(layered: Path) -> None:
    child = load_recipe(layered)
    assert child.parent is not None
    assert child.parent.ttl == 86400.0
    assert child.n_ctx == 4096  # inherited
    assert child.pinned is False  # inherited
    assert child.ttl is None  # `ttl: null` overrides: never expires
    assert child.autosave is True  # default
    assert child.path == layered.resolve()
    assert child.line == 7


def test_messages_are_copies_so_recipes_stay_frozen(layered: Path) -> None:
    child = load_recipe(layered)
    child.messages[0]["content"] = "changed"
    child.tools[0]["function"]["name"] = "changed"
    assert child.messages[0]["content"] == "You are the base."
    assert child.tools[0]["function"]["name"] == "search"
    assert hash(child) == hash(load_recipe(layered))
    assert child == load_recipe(layered)


def test_child_with_only_tools_may_have_an_empty_prefix(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "prefix: [{system: base}]\n")
    path = write(
        tmp_path,
        "tooled.yaml",
        "extends: base.yaml\ntools: [{type: function, function: {name: go}}]\n",
    )
    recipe = load_recipe(path)
    assert recipe.own_messages == ()
    assert recipe.messages == [{"role": "system", "content": "base"}]
    assert recipe.line == 1


def test_child_without_tools_or_messages_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "prefix: [{system: base}]\n")
    path = write(tmp_path, "same.yaml", "extends: base.yaml\nprefix: []\n")
    with pytest.raises(RecipeError, match="list at least one message or add tools") as caught:
        load_recipe(path)
    assert caught.value.line == 2


def test_from_dict_builds_a_recipe_without_yaml(tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"prefix": [{"system": "hi"}], "ttl": "2h"}, path=tmp_path / "x.yaml")
    assert (recipe.name, recipe.ttl, recipe.pinned) == ("x", 7200.0, True)
    with pytest.raises(RecipeError, match="unknown top-level key 'prefx'"):
        Recipe.from_dict({"prefx": []}, path=tmp_path / "x.yaml")


def test_model_path_is_resolved_against_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    path = write(tmp_path, "r.yaml", "model: models/tiny.gguf\nprefix: [{system: hi}]\n")
    assert load_recipe(path).model == str(tmp_path / "models" / "tiny.gguf")


# --- includes ------------------------------------------------------------------------------------


def test_include_renders_files_sorted_by_path_under_the_header(tmp_path: Path) -> None:
    write(tmp_path, "src/b.py", "B = 2\n")
    write(tmp_path, "src/a.py", "A = 1")  # no final newline
    write(tmp_path, "src/sub/c.py", "C = 3\n")
    write(tmp_path, "src/notes.txt", "not python\n")
    path = write(
        tmp_path,
        "recipes/code.yaml",
        """
        prefix:
          - system: Be brief.
          - include:
              header: "Here is the code:"
              paths: ["../src/**/*.py", "../src/b.py"]
        """,
    )
    recipe = load_recipe(path)
    assert recipe.own_messages[1] == {
        "role": "user",
        "content": (
            "Here is the code:\n\n"
            "### ../src/a.py\n```\nA = 1\n```\n\n"
            "### ../src/b.py\n```\nB = 2\n```\n\n"
            "### ../src/sub/c.py\n```\nC = 3\n```\n"
        ),
    }
    (spec,) = recipe.includes
    assert spec.message_index == 1
    assert spec.line == 3
    assert spec.role == "user"
    assert spec.files == tuple(tmp_path / "src" / n for n in ("a.py", "b.py", "sub/c.py"))


def test_include_fence_is_longer_than_backticks_in_the_file(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "Run:\n```sh\nmake\n```\n")
    path = write(tmp_path, "r.yaml", "prefix:\n  - include: {paths: [README.md], role: system}\n")
    message = load_recipe(path).own_messages[0]
    assert message == {
        "role": "system",
        "content": "### README.md\n````\nRun:\n```sh\nmake\n```\n````\n",
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git-like tree: ignore rules at the root and in the recipe folder, files in both."""
    (tmp_path / ".git").mkdir()
    write(tmp_path, ".gitignore", "*.log\nbuild/\n!keep.log\n")
    write(tmp_path, "src/app.py", "app\n")
    write(tmp_path, "src/debug.log", "noise\n")
    write(tmp_path, "src/keep.log", "kept\n")
    write(tmp_path, "src/build/gen.py", "generated\n")
    write(tmp_path, "src/tests/test_app.py", "test\n")
    write(tmp_path, "recipes/.gitignore", "secret.txt\n")
    write(tmp_path, "recipes/notes.txt", "notes\n")
    write(tmp_path, "recipes/secret.txt", "password\n")
    write(tmp_path, "recipes/.hidden.txt", "hidden\n")
    return tmp_path


def included_names(recipe_path: Path) -> list[str]:
    (spec,) = load_recipe(recipe_path).includes
    return [file.name for file in spec.files]


def test_gitignored_files_are_skipped(repo: Path) -> None:
    path = write(repo, "recipes/r.yaml", 'prefix: [{include: {paths: ["../src/**", "*.txt"]}}]\n')
    # sorted by path relative to the recipe: "../src/..." before "notes.txt"
    assert included_names(path) == ["app.py", "keep.log", "test_app.py", "notes.txt"]


def test_gitignore_false_keeps_ignored_files(repo: Path) -> None:
    path = write(
        repo,
        "recipes/r.yaml",
        'prefix: [{include: {paths: ["../src/**", "*.txt"], gitignore: false}}]\n',
    )
    assert included_names(path) == [
        "app.py",
        "gen.py",
        "debug.log",
        "keep.log",
        "test_app.py",
        "notes.txt",
        "secret.txt",
    ]


def test_extra_ignore_patterns_are_relative_to_the_recipe(repo: Path) -> None:
    path = write(
        repo,
        "recipes/r.yaml",
        'prefix: [{include: {paths: ["../src/**"], ignore: ["../src/tests/", "*.log"]}}]\n',
    )
    assert included_names(path) == ["app.py"]


def test_a_named_file_is_included_even_if_ignored(repo: Path) -> None:
    path = write(repo, "recipes/r.yaml", "prefix: [{include: {paths: [secret.txt]}}]\n")
    assert included_names(path) == ["secret.txt"]


def test_content_digest_follows_included_files_only(repo: Path) -> None:
    path = write(repo, "recipes/r.yaml", "ttl: 1h\nprefix: [{include: {paths: ['../src/**']}}]\n")
    digest = load_recipe(path).content_digest()
    assert len(digest) == 64
    assert load_recipe(path).content_digest() == digest

    (repo / "src" / "debug.log").write_text("ignored, so it does not count\n")
    path.write_text("ttl: 2h\npinned: false\nprefix: [{include: {paths: ['../src/**']}}]\n")
    assert load_recipe(path).content_digest() == digest

    (repo / "src" / "app.py").write_text("app, edited\n")
    assert load_recipe(path).content_digest() != digest


def test_content_digest_covers_tools_and_n_ctx(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "prefix: [{system: hi}]\n")
    plain = load_recipe(path).content_digest()
    write(tmp_path, "r.yaml", "n_ctx: 2048\nprefix: [{system: hi}]\n")
    assert load_recipe(path).content_digest() != plain
    write(
        tmp_path,
        "r.yaml",
        "tools: [{type: function, function: {name: f}}]\nprefix: [{system: hi}]\n",
    )
    assert load_recipe(path).content_digest() != plain


# --- loading many --------------------------------------------------------------------------------


def test_folder_loading_puts_parents_before_children(tmp_path: Path) -> None:
    write(tmp_path, "a-child.yaml", "extends: z-base.yaml\nprefix: [{user: a}]\n")
    write(tmp_path, "m-other.yml", "prefix: [{system: other}]\n")
    write(tmp_path, "z-base.yaml", "prefix: [{system: base}]\n")
    write(tmp_path, "b-child.yaml", "extends: z-base.yaml\nprefix: [{user: b}]\n")
    write(tmp_path, "notes.txt", "not a recipe\n")
    recipes = load_recipes([tmp_path])
    assert [r.name for r in recipes] == ["z-base", "a-child", "b-child", "m-other"]
    assert recipes[1].parent is recipes[0]
    assert recipes[2].parent is recipes[0]


def test_a_parent_not_named_is_still_loaded_once(tmp_path: Path) -> None:
    write(tmp_path, "parents/base.yaml", "prefix: [{system: base}]\n")
    one = write(tmp_path, "one.yaml", "extends: parents/base.yaml\nprefix: [{user: one}]\n")
    two = write(tmp_path, "two.yaml", "extends: parents/base.yaml\nprefix: [{user: two}]\n")
    assert [r.name for r in load_recipes([str(one), two])] == ["base", "one", "two"]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing", "no such recipe file or folder"),
        (lambda d: d, "folder holds no *.yaml or *.yml recipes"),
    ],
    ids=["missing", "empty-folder"],
)
def test_load_recipes_refuses_bad_arguments(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str
) -> None:
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        load_recipes([make(tmp_path)])


def test_load_recipes_refuses_two_recipes_with_one_name(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: agent\nprefix: [{system: a}]\n")
    write(tmp_path, "b.yaml", "name: agent\nprefix: [{system: b}]\n")
    with pytest.raises(RecipeError, match="recipe name 'agent' is already used") as caught:
        load_recipes([tmp_path])
    assert caught.value.path == str((tmp_path / "b.yaml").resolve())


# --- confinement to a root folder (the server's loader) ------------------------------------------

SECRET = "TOP SECRET: the database password is hunter2"


def _escape_absolute(recipes: Path, outside: Path) -> tuple[str, int]:
    return f"prefix:\n  - system: s\n  - include:\n      paths: [{outside / 'secret.txt'}]\n", 4


def _escape_dotdot(recipes: Path, outside: Path) -> tuple[str, int]:
    return "prefix:\n  - system: s\n  - include:\n      paths: [../outside/secret.txt]\n", 4


def _escape_symlinked_file(recipes: Path, outside: Path) -> tuple[str, int]:
    (recipes / "docs").mkdir()
    (recipes / "docs" / "notes.txt").symlink_to(outside / "secret.txt")
    return "prefix:\n  - include:\n      paths: [docs/notes.txt]\n", 3


def _escape_symlinked_folder_glob(recipes: Path, outside: Path) -> tuple[str, int]:
    (recipes / "docs").mkdir()
    (recipes / "docs" / "readme.txt").write_text("inside\n")
    (recipes / "docs" / "more").symlink_to(outside, target_is_directory=True)
    return "prefix:\n  - include:\n      paths: ['docs/**/*.txt']\n", 3


def _escape_extends(recipes: Path, outside: Path) -> tuple[str, int]:
    return "name: agent\nextends: ../outside/base.yaml\nprefix: [{user: hi}]\n", 2


@pytest.mark.parametrize(
    "escape",
    [
        _escape_absolute,
        _escape_dotdot,
        _escape_symlinked_file,
        _escape_symlinked_folder_glob,
        _escape_extends,
    ],
    ids=["absolute", "dotdot", "symlinked-file", "symlinked-folder-glob", "extends"],
)
def test_a_root_refuses_files_outside_it_and_no_root_reads_them(
    tmp_path: Path, escape: Callable[[Path, Path], tuple[str, int]]
) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.txt", SECRET + "\n")
    write(outside, "base.yaml", f"name: base\nprefix: [{{system: '{SECRET}'}}]\n")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    text, line = escape(recipes, outside)
    agent = write(recipes, "agent.yaml", text)

    with pytest.raises(RecipeError, match="outside the recipe root") as caught:
        load_recipes([recipes], root=recipes)
    assert caught.value.path == str(agent.resolve())
    assert caught.value.line == line
    assert str(recipes.resolve()) in str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(RecipeError, match="outside the recipe root"):
        load_recipe(agent, root=recipes)

    # Without a root (the CLI's loader) the same recipe reads the file.
    loaded = {r.name: r for r in load_recipes([recipes])}
    assert any(SECRET in m["content"] for m in loaded["agent"].messages)


def test_a_root_refuses_a_recipe_file_that_is_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", "stray.yaml", "prefix: [{system: stray}]\n")
    recipes = tmp_path / "recipes"
    write(recipes, "agent.yaml", "prefix: [{system: agent}]\n")
    (recipes / "stray.yaml").symlink_to(outside)
    with pytest.raises(RecipeError, match=r"recipe file: .* is outside the recipe root"):
        load_recipes([recipes], root=recipes)
    assert [r.name for r in load_recipes([recipes])] == ["agent", "stray"]


def test_a_root_allows_files_and_symlinks_that_stay_under_it(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    write(recipes, "shared/base.yaml", "prefix: [{system: base}]\n")
    write(recipes, "docs/a.txt", "alpha\n")
    (recipes / "docs" / "alias.txt").symlink_to(recipes / "docs" / "a.txt")
    write(
        recipes,
        "agents/agent.yaml",
        """\
        extends: ../shared/base.yaml
        prefix:
          - include:
              paths: [../docs/alias.txt, '../docs/*.txt']
        """,
    )
    # A root given through a symlink compares after resolving too.
    link = tmp_path / "link"
    link.symlink_to(recipes, target_is_directory=True)
    (agent,) = [r for r in load_recipes([recipes / "agents"], root=link) if r.name == "agent"]
    assert agent.parent is not None and agent.parent.name == "base"
    assert [f.name for f in agent.includes[0].files] == ["a.txt", "alias.txt"]


def test_a_root_hides_whether_a_file_outside_it_exists(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    write(recipes, "a.yaml", "prefix:\n  - include:\n      paths: [/no/such/file.txt]\n")
    with pytest.raises(RecipeError, match="outside the recipe root"):
        load_recipes([recipes], root=recipes)


# --- token checks --------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Path:
    write(tmp_path, "words.txt", "one two three four five six seven eight\n")
    write(
        tmp_path,
        "base.yaml",
        """
        prefix:
          - system: base
          - include: {paths: [words.txt], max_tokens: 100}
        """,
    )
    return write(
        tmp_path,
        "child.yaml",
        """
        extends: base.yaml
        prefix:
          - user: hi
          - include:
              paths: [words.txt]
              max_tokens: 12
        """,
    )


def test_token_limits_pass_when_includes_are_small_enough(limited: Path) -> None:
    check_token_limits(load_recipe(limited), word_count)


def test_token_limit_error_names_the_include_and_both_numbers(limited: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        check_token_limits(load_recipe(limited), lambda text: 3 * word_count(text))
    error = caught.value
    assert (error.path, error.line) == (str(limited), 4)
    assert "renders to 36 tokens, more than max_tokens 12" in str(error)


def test_token_limit_in_the_parent_names_the_parent_file(limited: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        check_token_limits(load_recipe(limited), lambda text: 1000)
    assert (caught.value.path, caught.value.line) == (str(limited.parent / "base.yaml"), 3)


def test_check_fits_names_the_prefix_line_and_both_numbers(layered: Path) -> None:
    recipe = load_recipe(layered)
    check_fits(recipe, 4096, 4096)
    with pytest.raises(RecipeError) as caught:
        check_fits(recipe, 9000, 8192)
    error = caught.value
    assert (error.path, error.line) == (str(layered.resolve()), 7)
    assert "needs 9000 tokens but the context holds 8192; raise n_ctx" in str(error)


# --- ttl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (90, 90.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("1h30m", 5400.0),
        (" 1.5h ", 5400.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(
    value: str | float | None, seconds: float | None
) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "7 days", "h", "", "-5m", "0s", 0, -3, float("inf")])
def test_parse_duration_rejects_bad_values(value: str | float) -> None:
    with pytest.raises(ValueError, match=r"expected seconds|must be a positive duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, [1], {"d": 1}])
def test_parse_duration_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_duration(value)  # type: ignore[arg-type]


# --- the recipes we ship -------------------------------------------------------------------------


def test_shipped_recipes_load_and_fit_a_small_context() -> None:
    recipes = {recipe.name: recipe for recipe in load_recipes([SHIPPED])}
    assert set(recipes) == {
        "coding-agent",
        "support-bot",
        "team-base",
        "team-reviewer",
        "team-tester",
    }
    for recipe in recipes.values():
        text = "".join(m["content"] for m in recipe.messages) + str(recipe.tools)
        approx_tokens = len(text) // 4
        assert 300 <= approx_tokens <= 2500, (recipe.name, approx_tokens)
        check_token_limits(recipe, lambda t: len(t) // 4)
        check_fits(recipe, approx_tokens, recipe.n_ctx or 8192)


def test_shipped_recipes_are_what_their_agents_need() -> None:
    recipes = {recipe.name: recipe for recipe in load_recipes([SHIPPED])}
    assert [t["function"]["name"] for t in recipes["support-bot"].tools] == [
        "lookup_order",
        "refund_order",
        "search_faq",
    ]
    assert [m["role"] for m in recipes["support-bot"].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    for child in ("team-reviewer", "team-tester"):
        assert recipes[child].parent is recipes["team-base"]
    (include,) = recipes["coding-agent"].includes
    assert [f.name for f in include.files] == ["config.py", "errors.py"]
    assert include.max_bytes is not None
    assert "class RecipeError" in recipes["coding-agent"].messages[1]["content"]


# --- OpenAI-shaped messages and aliases (issue 13) -----------------------------------------------

LOOKUP_TOOL = """
tools:
  - type: function
    function:
      name: lookup_order
      parameters: {type: object, properties: {order_id: {type: string}}}
"""


def test_an_openai_message_loads_as_its_shorthand_does(tmp_path: Path) -> None:
    short = write(tmp_path, "short.yaml", "prefix:\n  - system: Be brief.\n  - user: Hi\n")
    openai_shaped = write(
        tmp_path,
        "long.yaml",
        """
        prefix:
          - role: system
            content: Be brief.
          - role: user
            content: [{type: text, text: "H"}, {type: text, text: "i"}]
        """,
    )
    assert load_recipe(openai_shaped).messages == load_recipe(short).messages
    assert load_recipe(openai_shaped).content_digest() == load_recipe(short).content_digest()


def test_a_few_shot_block_with_tool_calls_is_kept_as_a_client_sends_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "agent.yaml",
        LOOKUP_TOOL
        + """
prefix:
  - system: You look up orders.
  - role: developer
    content: Call lookup_order before answering.
  - {role: user, content: "Where is A1?", name: ana}
  - role: assistant
    content: null
    tool_calls:
      - id: call_1
        type: function
        function: {name: lookup_order, arguments: '{"order_id": "A1"}'}
      - id: call_2
        type: function
        function:
          name: lookup_order
          arguments: {order_id: A2}
  - {role: tool, tool_call_id: call_1, content: '{"status": "shipped"}'}
  - {role: tool, tool_call_id: call_2, content: ""}
  - assistant: A1 has shipped.
""",
    )
    recipe = load_recipe(path)
    assert recipe.messages[1:] == [
        {"role": "developer", "content": "Call lookup_order before answering."},
        {"role": "user", "content": "Where is A1?", "name": "ana"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "A1"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "A2"}'},
                },
            ],
        },
        {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "A1 has shipped."},
    ]
    recipe.messages[3]["tool_calls"][0]["id"] = "changed"  # copies: the recipe stays frozen
    assert recipe.messages[3]["tool_calls"][0]["id"] == "call_1"


def test_a_child_answers_a_call_its_parent_made(tmp_path: Path) -> None:
    write(
        tmp_path,
        "base.yaml",
        LOOKUP_TOOL
        + """
prefix:
  - role: assistant
    tool_calls: [{id: c1, type: function, function: {name: lookup_order, arguments: "{}"}}]
""",
    )
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nprefix: [{role: tool, tool_call_id: c1, content: ok}]\n",
    )
    assert [m["role"] for m in load_recipe(child).messages] == ["assistant", "tool"]
    again = write(
        tmp_path,
        "again.yaml",
        """
        extends: base.yaml
        prefix:
          - role: assistant
            tool_calls: [{id: c1, type: function, function: {name: lookup_order, arguments: "{}"}}]
        """,
    )
    with pytest.raises(RecipeError, match="tool call id 'c1' is used twice") as caught:
        load_recipe(again)
    assert caught.value.line == 4


CALL = "{id: c1, type: function, function: {name: lookup_order, arguments: '{}'}}"

# (the prefix items, the line of the error, a fragment of its message); tools: LOOKUP_TOOL
BAD_MESSAGES: list[tuple[str, int, str]] = [
    (
        "- {role: wizard, content: hi}",
        7,
        "unknown role 'wizard'; expected one of: system, developer",
    ),
    ("- {role: sytem, content: hi}", 7, "(did you mean 'system'?)"),
    ("- role: user\n  contents: hi", 8, "unknown message key 'contents' (did you mean 'content'?)"),
    ("- {content: hi}", 7, "an OpenAI-shaped message needs role:"),
    ("- {system: hi, user: ho}", 7, "exactly one key of system, user, assistant, include; got 2"),
    ("- {role: system}", 7, "a system message needs content"),
    (
        "- {role: assistant}",
        7,
        "an assistant message needs content: text or a list of text parts (or tool_calls)",
    ),
    ("- {role: user, content: ''}", 7, "content must be non-empty text"),
    ("- role: user\n  content: [{type: image_url, image_url: {url: x}}]", 8, "got 'image_url'"),
    ("- role: user\n  content:\n    - {type: text, txt: hi}", 9, "unknown content part key 'txt'"),
    ("- {role: user, content: hi, name: 3}", 7, "name must be non-empty text, got 3"),
    ("- {role: tool, content: ok}", 7, "a tool message needs tool_call_id"),
    ("- {role: tool, content: ok, tool_call_id: c9}", 7, "'c9' answers no earlier tool call (none"),
    (f"- {{role: user, content: hi, tool_calls: [{CALL}]}}", 7, "tool_calls belong"),
    ("- {role: user, content: hi, tool_call_id: c1}", 7, "tool_call_id belongs to tool messages"),
    ("- {role: assistant, tool_calls: []}", 7, "tool_calls must be a non-empty list"),
    ("- {role: assistant, tool_calls: [c1]}", 7, "a tool call must be a mapping"),
    (
        "- role: assistant\n  tool_calls:\n    - {type: function, function: {name: x}}",
        9,
        "a tool call needs id",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      function: {name: lookup_order}",
        9,
        "tool call type must be 'function', got null",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - {id: c1, type: function}",
        9,
        "needs function: a mapping with name and arguments",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function: {arguments: '{}'}",
        11,
        "a tool call's function needs a name",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function: {name: refund, arguments: '{}'}",
        11,
        "'refund', which is not among the recipe's tools (lookup_order)",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function:\n        name: lookup_order\n        arguments: '{\"order_id\": '",
        13,
        "arguments is not valid JSON",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function: {name: lookup_order, arguments: [1, 2]}",
        11,
        "arguments must be a JSON object (as text or a mapping), got a list",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function: {name: lookup_order}",
        11,
        "needs arguments: JSON text or a mapping",
    ),
    (
        "- role: assistant\n  tool_calls:\n    - id: c1\n      type: function\n"
        "      function: {name: lookup_order, arguments: '{}', strict: true}",
        11,
        "unknown tool call function key 'strict'",
    ),
]


@pytest.mark.parametrize(("items", "line", "fragment"), BAD_MESSAGES)
def test_a_malformed_openai_message_is_one_error_with_file_and_line(
    tmp_path: Path, items: str, line: int, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(LOOKUP_TOOL.lstrip("\n") + "prefix:\n" + textwrap.indent(items, "  ") + "\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert caught.value.path == str(path)
    assert (caught.value.line, fragment in str(caught.value)) == (line, True), str(caught.value)


def test_calls_may_name_any_function_when_the_recipe_has_no_tools(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "free.yaml",
        f"prefix:\n  - role: assistant\n    tool_calls: [{CALL.replace('lookup_order', 'f')}]\n",
    )
    assert load_recipe(path).messages[0]["tool_calls"][0]["function"]["name"] == "f"


def test_aliases_are_other_names_for_a_recipe(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bot.yaml",
        "name: bot\naliases: [gpt-4o-mini, acme/bot:v2]\nprefix: [{system: hi}]\n",
    )
    assert load_recipe(path).aliases == ("gpt-4o-mini", "acme/bot:v2")
    child = write(tmp_path, "child.yaml", "extends: bot.yaml\nprefix: [{user: ho}]\n")
    assert load_recipe(child).aliases == ()  # an alias names one recipe: not inherited


@pytest.mark.parametrize(
    ("aliases", "line", "fragment"),
    [
        ("[bot]", 2, "alias 'bot' is the recipe's name"),
        ("[a, a]", 2, "alias 'a' is given twice"),
        ("\n  - ok\n  - 'has space'", 4, "an alias must be 1-128 letters"),
        ("gpt", 2, "aliases must be a list of text"),
    ],
)
def test_bad_aliases_are_refused(tmp_path: Path, aliases: str, line: int, fragment: str) -> None:
    path = write(tmp_path, "bot.yaml", f"name: bot\naliases: {aliases}\nprefix: [{{system: hi}}]\n")
    with pytest.raises(RecipeError, match=re.escape(fragment)) as caught:
        load_recipe(path)
    assert caught.value.line == line


def test_an_alias_may_not_name_another_recipe(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: alpha\naliases: [shared]\nprefix: [{system: a}]\n")
    b = write(
        tmp_path, "b.yaml", "name: beta\naliases:\n  - mine\n  - alpha\nprefix: [{system: b}]\n"
    )
    with pytest.raises(
        RecipeError, match="alias 'alpha' is already the name of recipe 'alpha'"
    ) as caught:
        load_recipes([tmp_path])
    assert (caught.value.path, caught.value.line) == (str(b.resolve()), 4)
    b.write_text("name: beta\naliases: [shared]\nprefix: [{system: b}]\n")
    with pytest.raises(RecipeError, match="alias 'shared' is already the alias of recipe 'alpha'"):
        load_recipes([tmp_path])


def test_the_example_of_openai_messages_extends_the_support_bot() -> None:
    recipes = {r.name: r for r in load_recipes([SHIPPED / "examples"])}
    assert set(recipes) == {"support-bot", "support-bot-tools"}  # the parent comes with it
    example = recipes["support-bot-tools"]
    assert example.aliases == ("support",)
    assert [m["role"] for m in example.own_messages] == ["user", "assistant", "tool", "assistant"]
    (call,) = example.own_messages[1]["tool_calls"]
    assert call["function"]["name"] == "lookup_order"
    assert example.own_messages[2]["tool_call_id"] == call["id"]
