"""The loaded recipe: a frozen :class:`Recipe` with its own messages and tools, its parent and
its resolved settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fields import (
    _TOP_LEVEL_KEYS,
    _check_keys,
    _get_bool,
    _get_positive_int,
    _inherit,
    _parse_aliases,
    _parse_chat,
    _parse_model,
    _parse_name,
    _parse_tools,
    _parse_ttl,
)
from .include import IncludeSpec
from .messages import _parse_prefix
from .paths import RecipeRoot, _roots
from .yaml import _key_line


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: its own messages and tools, its parent, and its resolved settings."""

    name: str
    path: Path  #: absolute path of the YAML file
    parent: Recipe | None
    model: str | None  #: absolute path of the GGUF file, or None for the default model
    n_ctx: int | None
    pinned: bool
    ttl: float | None  #: seconds, or None for no expiry
    autosave: bool
    own_messages: tuple[dict[str, Any], ...]
    own_tools: tuple[dict[str, Any], ...]
    includes: tuple[IncludeSpec, ...]
    line: int  #: line of the ``prefix:`` key, or 1
    #: Other names a server accepts as ``model`` for this recipe; not inherited.
    aliases: tuple[str, ...] = ()
    #: The model section's chat template file (absolute path) or llama-cpp-python chat format;
    #: inherited with the model.
    chat_template: str | None = None
    chat_format: str | None = None

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        path: str | Path,
        parent: Recipe | None = None,
        root: RecipeRoot = None,
    ) -> Recipe:
        """Build a recipe from parsed YAML; included files are read now.

        ``extends`` is not followed here: the caller passes the loaded parent (as
        :func:`load_recipe` does). Settings absent from ``data`` are taken from the parent.
        With ``root``, included files must resolve under one of its folders.
        """
        path = Path(path).absolute()
        _check_keys(data, _TOP_LEVEL_KEYS, "top-level key", path)
        tools = _parse_tools(data, path, parent)
        tool_names = [t["function"]["name"] for t in (*(parent.tools if parent else []), *tools)]
        messages, includes = _parse_prefix(
            data, path, parent, has_tools=bool(tools), roots=_roots(root), tool_names=tool_names
        )
        name = _parse_name(data, path)
        chat_template, chat_format = _parse_chat(data, path, parent)
        return cls(
            chat_template=chat_template,
            chat_format=chat_format,
            name=name,
            aliases=_parse_aliases(data, path, name),
            path=path,
            parent=parent,
            model=_parse_model(data, path, parent),
            n_ctx=_inherit(data, "n_ctx", parent, _get_positive_int(data, "n_ctx", path)),
            pinned=_inherit(data, "pinned", parent, _get_bool(data, "pinned", path, True)),
            ttl=_inherit(data, "ttl", parent, _parse_ttl(data, path)),
            autosave=_inherit(data, "autosave", parent, _get_bool(data, "autosave", path, True)),
            own_messages=messages,
            own_tools=tools,
            includes=includes,
            line=_key_line(data, "prefix") if "prefix" in data else 1,
        )

    def __hash__(self) -> int:
        # The generated hash would fail on the dicts inside; equal recipes share a path anyway.
        return hash(self.path)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The full prefix: the parent's messages, then this recipe's own (copies)."""
        inherited = self.parent.messages if self.parent else []
        return inherited + copy.deepcopy(list(self.own_messages))

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The parent's tools, then this recipe's own."""
        inherited = self.parent.tools if self.parent else []
        return inherited + copy.deepcopy(list(self.own_tools))

    @property
    def chain(self) -> list[Recipe]:
        """The root ancestor first, then each child down to this recipe."""
        return [*self.parent.chain, self] if self.parent else [self]

    def content_digest(self) -> str:
        """SHA-256 over everything that decides the prefix's KV state, to tell if it is current.

        Covers the rendered messages (so an edited included file changes it), the tools, the model,
        the chat template (its text) or format, and n_ctx; not pinned, ttl or autosave, which only
        decide how long the state is kept.
        """
        payload: dict[str, Any] = {
            "messages": self.messages,
            "tools": self.tools,
            "model": self.model,
            "n_ctx": self.n_ctx,
        }
        if self.chat_template or self.chat_format:  # absent keys keep older digests valid
            payload["chat"] = self.chat_format or _file_sha256(self.chat_template)
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _file_sha256(path: str | None) -> str:
    """SHA-256 of a file's bytes ("" when it cannot be read: the digest then changes later)."""
    try:
        return hashlib.sha256(Path(str(path)).read_bytes()).hexdigest()
    except OSError:
        return ""
