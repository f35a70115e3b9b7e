"""Recipe YAML with line numbers: safe loading that records the line of every mapping, key and
item, rejects repeated keys, and turns every read or parse failure into a RecipeError naming
the file and line.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from ..errors import RecipeError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class _List(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _Loader(yaml.SafeLoader):
    """Safe YAML loading that records line numbers and rejects repeated keys."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in first_lines:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first_lines[key]})",
                    key_node.start_mark,
                )
            first_lines[key] = _node_line(key_node)
        return super().construct_mapping(node, deep)


def _node_line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _construct_map(loader: _Loader, node: MappingNode) -> Iterator[_Map]:
    data = _Map(_node_line(node))
    yield data  # yielded first so that recursive anchors resolve, as in SafeConstructor
    data.update(loader.construct_mapping(node))
    data.key_lines = {
        loader.construct_object(key): _node_line(key)
        for key, _ in node.value
        if key.tag != _MERGE_TAG
    }


def _construct_seq(loader: _Loader, node: SequenceNode) -> Iterator[_List]:
    data = _List(_node_line(node))
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [_node_line(item) for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _read_yaml(path: Path) -> _Map:
    """Parse a recipe file into a :class:`_Map`, turning every failure into a RecipeError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("no such recipe file", path=path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError("the recipe is not UTF-8 text", path=path, line=line) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if mark is None or (exc.context_mark is not None and mark.index >= len(text.rstrip())):
            # The problem is the end of the file (an unclosed quote or bracket): point at its start.
            mark = exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = f" ({exc.context})" if exc.context and exc.problem else ""
        message = f"invalid YAML: {exc.problem or exc.context}{detail}"
        raise RecipeError(message, path=path, line=line) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        position = getattr(exc, "position", 0)
        line = text.count("\n", 0, position) + 1
        raise RecipeError(f"invalid YAML: {exc}", path=path, line=line) from None
    if not isinstance(data, _Map):
        line = data.line if isinstance(data, _List) else 1
        raise RecipeError(
            f"the top level must be a mapping with keys such as prefix:, got {_show(data)}",
            path=path,
            line=line,
        )
    return data


def _key_line(data: Mapping[Any, Any], key: Any) -> int:
    """Line of ``key`` in a parsed mapping (its own line if the key is absent; 1 if unknown)."""
    if isinstance(data, _Map):
        return data.key_lines.get(key, data.line)
    return 1


def _item_lines(items: Sequence[Any], default: int) -> list[int]:
    if isinstance(items, _List):
        return items.item_lines
    return [default] * len(items)


def _show(value: Any) -> str:
    """A short description of a YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"
