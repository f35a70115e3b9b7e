"""A radix tree over token ids that indexes stored segments.

A segment covers a token span ``[start, end)`` of one conversation prefix and chains to the
segment that ends at ``start`` (its parent). The tree holds the full token path of every segment,
split on partial matches like sglang's radix cache; every edge records which segments cover it, so
a prompt that diverges in the middle of a segment still finds that segment (it is restored and
trimmed). Lookup walks the prompt once: its cost grows with the prompt length, not with the number
of stored segments. The tree does no I/O and needs no model.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

Tokens = Sequence[int]


def as_tokens(tokens: Iterable[int]) -> array:
    """Token ids as a compact ``array('i')``: 4 bytes a token, compared in C."""
    if isinstance(tokens, array) and tokens.typecode == "i":
        return tokens
    return array("i", tokens)


def common_prefix_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class _Node:
    edge: array
    depth: int  # number of tokens from the root to the end of this node's edge
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    cover: set[str] = field(default_factory=set)  # segments whose span contains this edge
    ends: set[str] = field(default_factory=set)  # segments that end exactly here


@dataclass
class _Span:
    parent: str | None
    start: int
    end: int
    node: _Node
    children: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Match:
    """The result of a lookup.

    ``length`` tokens of the prompt are in the tree. ``chain`` lists the segment keys to restore,
    root first; the last one covers position ``length - 1`` and may extend past it (``chain_end``),
    in which case the restore trims it back to ``length``.
    """

    length: int
    chain: tuple[str, ...]
    chain_end: int

    @property
    def hit(self) -> bool:
        return self.length > 0


MISS = Match(0, (), 0)


class RadixIndex:
    """Token radix tree over the segments of one model fingerprint and namespace."""

    def __init__(self) -> None:
        self._root = _Node(edge=array("i"), depth=0, parent=None)
        self._spans: dict[str, _Span] = {}
        self._first: set[str] = set()  # segments that start at position 0

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, key: object) -> bool:
        return key in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def span(self, key: str) -> tuple[int, int]:
        """``(start, end)`` token positions of a segment."""
        s = self._spans[key]
        return s.start, s.end

    def parent(self, key: str) -> str | None:
        return self._spans[key].parent

    def children(self, key: str) -> frozenset[str]:
        return frozenset(self._spans[key].children)

    def roots(self) -> list[str]:
        return list(self._first)

    def first(self) -> frozenset[str]:
        """Segments that start at position 0 (no parent)."""
        return frozenset(self._first)

    def leaves(self) -> list[str]:
        """Segments that no other segment chains to (the only ones that may be removed)."""
        return [k for k, s in self._spans.items() if not s.children]

    def chain(self, key: str) -> tuple[str, ...]:
        """The segment and its ancestors, root first."""
        out: list[str] = []
        k: str | None = key
        while k is not None:
            out.append(k)
            k = self._spans[k].parent
        return tuple(reversed(out))

    def descendants(self, key: str) -> list[str]:
        """Every segment that chains to ``key``, deepest first (a safe removal order)."""
        order: list[str] = []
        stack = list(self._spans[key].children)
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(self._spans[k].children)
        return list(reversed(order))

    def tokens(self, key: str) -> array:
        """The full token path from position 0 to the end of the segment."""
        parts: list[array] = []
        node: _Node | None = self._spans[key].node
        while node is not None:
            parts.append(node.edge)
            node = node.parent
        out = array("i")
        for part in reversed(parts):
            out.extend(part)
        return out

    def insert(self, key: str, parent: str | None, tokens: Iterable[int]) -> None:
        """Add a segment of ``tokens`` that continues ``parent`` (None: starts at position 0).

        Inserting a key twice is a no-op. The parent must already be in the index.
        """
        if key in self._spans:
            return
        toks = as_tokens(tokens)
        if not toks:
            raise ValueError("a segment must hold at least one token")
        if parent is None:
            node = self._root
        else:
            if parent not in self._spans:
                raise KeyError(f"parent segment {parent} is not in the index")
            node = self._spans[parent].node
        start = node.depth
        path: list[_Node] = []
        pos = 0
        while pos < len(toks):
            child = node.children.get(toks[pos])
            if child is None:
                child = _Node(edge=toks[pos:], depth=node.depth + len(toks) - pos, parent=node)
                node.children[toks[pos]] = child
                path.append(child)
                node = child
                break
            n = common_prefix_length(child.edge, toks[pos : pos + len(child.edge)])
            if n < len(child.edge):
                child = self._split(child, n)
            path.append(child)
            node = child
            pos += n
        for n_ in path:
            n_.cover.add(key)
        node.ends.add(key)
        self._spans[key] = _Span(parent=parent, start=start, end=node.depth, node=node)
        if parent is not None:
            self._spans[parent].children.add(key)
        else:
            self._first.add(key)

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut ``node``'s edge after ``n`` tokens; return the new upper node."""
        assert node.parent is not None and 0 < n < len(node.edge)
        head = _Node(
            edge=node.edge[:n],
            depth=node.depth - len(node.edge) + n,
            parent=node.parent,
            cover=set(node.cover),
        )
        node.parent.children[head.edge[0]] = head
        node.edge = node.edge[n:]
        node.parent = head
        head.children[node.edge[0]] = node
        return head

    def match(self, tokens: Iterable[int]) -> Match:
        """Longest prefix of ``tokens`` held in the tree, and the segments that restore it."""
        toks = as_tokens(tokens)
        node = self._root
        pos = 0
        last: _Node | None = None
        while pos < len(toks):
            child = node.children.get(toks[pos])
            if child is None:
                break
            n = common_prefix_length(child.edge, toks[pos : pos + len(child.edge)])
            pos += n
            last = child
            if n < len(child.edge):
                break
            node = child
        if last is None or not last.cover:
            return MISS
        # Any segment covering the last matched token will do; the one ending soonest wastes
        # the fewest restored-then-trimmed tokens.
        best = min(last.cover, key=lambda k: (self._spans[k].end, k))
        return Match(length=pos, chain=self.chain(best), chain_end=self._spans[best].end)

    def deepest_boundary(self, tokens: Iterable[int]) -> tuple[str | None, int]:
        """The deepest segment whose whole path is a prefix of ``tokens``: ``(key, end)``.

        ``(None, 0)`` when none is. New segments for ``tokens`` chain from here.
        """
        toks = as_tokens(tokens)
        node = self._root
        pos = 0
        best: tuple[str | None, int] = (None, 0)
        while pos < len(toks):
            child = node.children.get(toks[pos])
            if child is None:
                break
            n = len(child.edge)
            if toks[pos : pos + n] != child.edge:
                break
            pos += n
            node = child
            if node.ends:
                best = (min(node.ends), pos)
        return best

    def remove(self, key: str) -> None:
        """Remove a leaf segment (one with no children) and prune the tree."""
        span = self._spans.get(key)
        if span is None:
            return
        if span.children:
            raise ValueError(f"segment {key} has children; remove them first")
        node: _Node | None = span.node
        span.node.ends.discard(key)
        while node is not None and node.depth > span.start:
            node.cover.discard(key)
            node = node.parent
        if span.parent is not None:
            self._spans[span.parent].children.discard(key)
        self._first.discard(key)
        del self._spans[key]
        self._prune(span.node)

    def _prune(self, node: _Node) -> None:
        """Drop uncovered leaves upward, then merge a lone child into its parent where possible."""
        while node.parent is not None and not node.cover and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
        if node.parent is not None and not node.ends and len(node.children) == 1:
            (child,) = node.children.values()
            if child.cover == node.cover:
                node.edge = node.edge + child.edge
                node.depth = child.depth
                node.children = child.children
                node.ends = child.ends
                for grandchild in node.children.values():
                    grandchild.parent = node
                for k in node.ends:
                    self._spans[k].node = node

    def node_count(self) -> int:
        """Number of tree nodes (for tests and the status command)."""
        count = 0
        stack = [self._root]
        while stack:
            n = stack.pop()
            count += 1
            stack.extend(n.children.values())
        return count
