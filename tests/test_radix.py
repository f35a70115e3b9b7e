"""The radix index alone (a pure data structure: no model, no I/O)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixcache.radix import RadixIndex, common_prefix_length


def test_empty_index_misses():
    assert not RadixIndex().match([1, 2, 3]).hit


def test_exact_and_partial_matches_pick_the_covering_chain():
    idx = RadixIndex()
    idx.insert("a", None, [1, 2, 3, 4])
    idx.insert("b", "a", [5, 6, 7])
    m = idx.match([1, 2, 3, 4, 5, 6, 7, 8])
    assert (m.length, m.chain, m.chain_end) == (7, ("a", "b"), 7)
    m = idx.match([1, 2, 3, 4, 5, 9])  # diverges inside b: restore b and trim
    assert (m.length, m.chain, m.chain_end) == (5, ("a", "b"), 7)
    m = idx.match([1, 2, 9])
    assert (m.length, m.chain) == (2, ("a",))


def test_branches_split_the_tree_and_prefer_the_shortest_covering_segment():
    idx = RadixIndex()
    idx.insert("long", None, [1, 2, 3, 4, 5, 6])
    idx.insert("head", None, [1, 2, 3])
    idx.insert("branch", "head", [7, 8])
    assert idx.match([1, 2, 3, 7, 8]).chain == ("head", "branch")
    assert idx.match([1, 2]).chain == ("head",)  # both cover; head wastes less
    assert idx.match([1, 2, 3, 4, 5]).chain == ("long",)
    assert idx.deepest_boundary([1, 2, 3, 7, 8, 9]) == ("branch", 5)
    assert idx.deepest_boundary([1, 2, 3, 4]) == ("head", 3)
    assert idx.deepest_boundary([9]) == (None, 0)


def test_remove_only_leaves_and_prune():
    idx = RadixIndex()
    idx.insert("a", None, [1, 2])
    idx.insert("b", "a", [3])
    idx.insert("c", "a", [4, 5])
    with pytest.raises(ValueError, match="children"):
        idx.remove("a")
    assert sorted(idx.leaves()) == ["b", "c"]
    assert idx.descendants("a")[-1] in {"b", "c"}
    idx.remove("b")
    assert idx.match([1, 2, 3]).length == 2
    idx.remove("c")
    idx.remove("a")
    assert len(idx) == 0 and idx.node_count() == 1


def test_insert_is_idempotent_and_needs_the_parent():
    idx = RadixIndex()
    idx.insert("a", None, [1])
    idx.insert("a", None, [1])
    assert len(idx) == 1
    with pytest.raises(KeyError):
        idx.insert("x", "missing", [2])
    with pytest.raises(ValueError):
        idx.insert("y", "a", [])


def test_tokens_and_chain_reconstruct_paths():
    idx = RadixIndex()
    idx.insert("a", None, [1, 2, 3])
    idx.insert("b", "a", [4])
    idx.insert("c", None, [1, 2, 9])
    assert list(idx.tokens("b")) == [1, 2, 3, 4]
    assert list(idx.tokens("c")) == [1, 2, 9]
    assert idx.chain("b") == ("a", "b")
    assert idx.span("b") == (3, 4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=12),
    st.lists(st.integers(0, 3), max_size=20),
)
def test_match_agrees_with_brute_force(spans, prompt):
    """Build random chains; the match must be the longest stored path prefix of the prompt."""
    idx = RadixIndex()
    paths: dict[str, list[int]] = {}
    rng = random.Random(len(spans))
    for i, span in enumerate(spans):
        parent = rng.choice([None, *paths]) if paths else None
        key = f"s{i}"
        idx.insert(key, parent, span)
        paths[key] = (paths[parent] if parent else []) + span
    best = max((common_prefix_length(p, prompt) for p in paths.values()), default=0)
    m = idx.match(prompt)
    assert m.length == best
    if best:
        last = m.chain[-1]
        assert paths[last][:best] == prompt[:best]
        for a, b in itertools.pairwise(m.chain):
            assert idx.parent(b) == a
    # Removing every leaf repeatedly empties the tree.
    while len(idx):
        for leaf in idx.leaves():
            idx.remove(leaf)
    assert idx.node_count() == 1
