"""Include items: which files an ``include`` names (globs, gitignore rules, confinement under a
root) and how they render into one message.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec

from ..errors import RecipeError
from .fields import (
    _check_keys,
    _get_bool,
    _get_optional_text,
    _get_positive_int,
    _get_text_list,
)
from .paths import RecipeRoot, _absolute, _confine, _display_path, _Roots, _roots
from .yaml import _item_lines, _key_line, _show

_INCLUDE_KEYS = ("paths", "ignore", "gitignore", "max_bytes", "max_tokens", "role", "header")
_INCLUDE_ROLES = ("system", "user")
_GLOB_RE = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class IncludeSpec:
    """One ``include`` item as written, plus the files it resolved to.

    The files render into one message: the header (if any), then for each file, in order of its
    POSIX path relative to the recipe folder, a block ``### <relpath>`` followed by the content in a
    fenced code block (the fence grows past any run of backticks inside the file).
    """

    line: int  #: line of the ``- include:`` item
    patterns: tuple[str, ...]
    ignore: tuple[str, ...]
    gitignore: bool
    max_bytes: int | None
    max_tokens: int | None
    role: str
    header: str | None
    files: tuple[Path, ...]  #: absolute paths, in render order
    message_index: int  #: index of the rendered message in the recipe's ``own_messages``

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        recipe_path: Path,
        line: int,
        message_index: int,
        root: RecipeRoot = None,
    ) -> IncludeSpec:
        """Validate an ``include`` mapping and resolve its paths against the recipe's folder.

        With ``root``, each file must resolve (after symlinks) under one of its folders.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(
                f"include must be a mapping with paths: [...], got {_show(data)}",
                path=recipe_path,
                line=line,
            )
        _check_keys(data, _INCLUDE_KEYS, "include key", recipe_path)
        if "paths" not in data:
            raise RecipeError(
                "include needs paths: a list of files or globs", path=recipe_path, line=line
            )
        patterns = _get_text_list(data, "paths", recipe_path, required=True)
        ignore = _get_text_list(data, "ignore", recipe_path, required=False)
        gitignore = _get_bool(data, "gitignore", recipe_path, default=True)
        role = data.get("role", "user")
        if role not in _INCLUDE_ROLES:
            raise RecipeError(
                f"include role must be one of {', '.join(_INCLUDE_ROLES)}, got {_show(role)}",
                path=recipe_path,
                line=_key_line(data, "role"),
            )
        rules = _IgnoreRules(recipe_path.parent, ignore, use_gitignore=gitignore)
        return cls(
            line=line,
            patterns=patterns,
            ignore=ignore,
            gitignore=gitignore,
            max_bytes=_get_positive_int(data, "max_bytes", recipe_path),
            max_tokens=_get_positive_int(data, "max_tokens", recipe_path),
            role=role,
            header=_get_optional_text(data, "header", recipe_path),
            files=_resolve_files(data["paths"], rules, recipe_path, _roots(root)),
            message_index=message_index,
        )


class _IgnoreRules:
    """Which globbed files an include skips: .gitignore files, then the include's own ignore list.

    As in git, a later or deeper pattern overrides an earlier one, so ``!keep.py`` re-includes.
    """

    def __init__(self, folder: Path, ignore: Sequence[str], *, use_gitignore: bool) -> None:
        self._folder = folder
        self._ignore = pathspec.GitIgnoreSpec.from_lines(ignore)
        self._use_gitignore = use_gitignore
        self._specs: dict[Path, pathspec.GitIgnoreSpec | None] = {}

    def ignores(self, file: Path) -> bool:
        ignored = False
        if self._use_gitignore:
            for folder in self._gitignore_folders(file):
                spec = self._gitignore(folder)
                if spec is not None:
                    ignored = _decide(spec, _display_path(file, folder), ignored)
        return _decide(self._ignore, _display_path(file, self._folder), ignored)

    def _gitignore_folders(self, file: Path) -> list[Path]:
        """Folders whose .gitignore applies to ``file``, outermost first.

        Up to the git root holding the file; outside git, up to the folder that holds both the
        file and the recipe, so that stray .gitignore files higher up do not count.
        """
        chain = [file.parent, *file.parent.parents]
        for index, folder in enumerate(chain):
            if (folder / ".git").exists():
                return chain[index::-1]
        for index, folder in enumerate(chain):
            if self._folder.is_relative_to(folder):
                return chain[index::-1]
        return [file.parent]

    def _gitignore(self, folder: Path) -> pathspec.GitIgnoreSpec | None:
        if folder not in self._specs:
            gitignore = folder / ".gitignore"
            lines = (
                gitignore.read_text("utf-8", "replace").splitlines() if gitignore.is_file() else []
            )
            self._specs[folder] = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        return self._specs[folder]


def _decide(spec: pathspec.GitIgnoreSpec, relpath: str, ignored: bool) -> bool:
    """Apply one set of gitignore patterns on top of the decision so far."""
    decision = spec.check_file(relpath).include
    return ignored if decision is None else decision


def _resolve_files(
    patterns: list[Any], rules: _IgnoreRules, recipe_path: Path, roots: _Roots = None
) -> tuple[Path, ...]:
    """Absolute paths of the files an include names, deduplicated, in render order.

    A plain path is taken as named; a glob (``*``, ``?``, ``[``; ``**`` recurses, names starting
    with a dot are skipped) keeps the files the ignore rules allow, and must keep at least one.
    With ``roots``, a file that resolves outside them is an error, not skipped: the recipe would
    not render what its author wrote.
    """
    folder = recipe_path.parent
    found: set[Path] = set()
    for pattern, line in zip(patterns, _item_lines(patterns, 1), strict=True):
        if _GLOB_RE.search(pattern):
            matches = [
                _absolute(folder, m) for m in glob.glob(pattern, root_dir=folder, recursive=True)
            ]
            files = [m for m in matches if m.is_file()]
            kept = [f for f in files if not rules.ignores(f)]
            if not kept:
                why = "files that are not ignored" if files else "files"
                raise RecipeError(
                    f"include pattern '{pattern}' matches no {why}", path=recipe_path, line=line
                )
            for file in kept:
                _confine(file, roots, "include", recipe_path, line, _display_path(file, folder))
            found.update(kept)
        else:
            file = _absolute(folder, pattern)
            _confine(file, roots, "include", recipe_path, line, pattern)
            if file.is_dir():
                raise RecipeError(
                    f"include: '{pattern}' is a folder; use '{pattern}/**' for the files in it",
                    path=recipe_path,
                    line=line,
                )
            if not file.is_file():
                raise RecipeError(f"include: no such file '{pattern}'", path=recipe_path, line=line)
            found.add(file)
    return tuple(sorted(found, key=lambda f: _display_path(f, folder)))


def _render_include(spec: IncludeSpec, recipe_path: Path) -> str:
    """The include's message: its header, then one fenced block per file."""
    folder = recipe_path.parent
    _check_max_bytes(spec, recipe_path)
    blocks = [spec.header.rstrip("\n") + "\n"] if spec.header else []
    for file in spec.files:
        shown = _display_path(file, folder)
        blocks.append(_file_block(shown, _read_text(file, shown, recipe_path, spec.line)))
    return "\n".join(blocks)


def _check_max_bytes(spec: IncludeSpec, recipe_path: Path) -> None:
    # Sizes come from stat, so a huge file is refused before it is read.
    if spec.max_bytes is None:
        return
    sizes = {file: file.stat().st_size for file in spec.files}
    total = sum(sizes.values())
    if total > spec.max_bytes:
        largest = max(sizes, key=lambda f: sizes[f])
        raise RecipeError(
            f"include's {len(sizes)} files total {total} bytes, more than max_bytes "
            f"{spec.max_bytes} (largest: {_display_path(largest, recipe_path.parent)}, "
            f"{sizes[largest]} bytes); narrow paths, add ignore patterns or raise max_bytes",
            path=recipe_path,
            line=spec.line,
        )


def _read_text(file: Path, shown: str, recipe_path: Path, line: int) -> str:
    """An included file's text; binary and non-UTF-8 files are errors, not mojibake."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise RecipeError(
            f"include: cannot read '{shown}': {exc.strerror}", path=recipe_path, line=line
        ) from None
    if b"\0" in data:
        raise RecipeError(
            f"include: '{shown}' is a binary file; ignore it or narrow paths",
            path=recipe_path,
            line=line,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"include: '{shown}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})",
            path=recipe_path,
            line=line,
        ) from None


def _file_block(shown: str, text: str) -> str:
    """``### path`` and the text in a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if not text or text.endswith("\n") else text + "\n"
    return f"### {shown}\n{fence}\n{body}{fence}\n"
