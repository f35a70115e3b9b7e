"""Where recipe files may be and how they are shown: confinement under a root (after symlinks),
paths relative to a recipe's folder, and the POSIX form used for sorting and headings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import RecipeError

#: What ``root`` may be given as: a folder, several folders, or None for no confinement.
RecipeRoot = str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None
#: The resolved root folders, or None.
_Roots = tuple[Path, ...] | None


def _roots(root: RecipeRoot) -> _Roots:
    """``root`` as resolved folders (symlinks followed, so that resolved files compare)."""
    if root is None:
        return None
    if isinstance(root, (str, os.PathLike)):
        root = [root]
    return tuple(Path(r).expanduser().resolve() for r in root)


def _confine(
    file: Path, roots: _Roots, what: str, path: Path, line: int | None, name: str | None = None
) -> None:
    """Refuse ``file`` unless it resolves, after symlinks, under one of ``roots``.

    Checked before the file's existence, so that errors do not tell whether a file outside the
    roots exists. The check happens at load time: it keeps a recipe from naming files outside
    the roots, not someone who can swap files while the loader runs.
    """
    if roots is None:
        return
    real = file.resolve()
    if any(real.is_relative_to(r) for r in roots):
        return
    shown = " or ".join(str(r) for r in roots)
    via = f" (it resolves to {real})" if real != Path(os.path.abspath(file)) else ""
    raise RecipeError(
        f"{what}: '{name or file}' is outside the recipe root {shown}{via}; only files under the "
        "root may be read",
        path=path,
        line=line,
    )


def _absolute(folder: Path, name: str) -> Path:
    """``name`` relative to ``folder`` (or absolute), with ``..`` folded but symlinks kept."""
    return Path(os.path.normpath(folder / name))


def _display_path(file: Path, folder: Path) -> str:
    """``file`` as a POSIX path relative to ``folder``; used for sorting and for headings."""
    try:
        return Path(os.path.relpath(file, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return file.as_posix()
