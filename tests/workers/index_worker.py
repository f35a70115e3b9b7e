"""One of several processes writing to one store at random while checking every lookup.

Usage: index_worker.py STORE_URL SEED ITERATIONS [sparse]. Each iteration puts a segment
(chained onto a random stored one, over a three-token alphabet so that prompts share and leave
prefixes everywhere), deletes one (any, also one with children), or pins or unpins, then looks
prompts up through a Catalog and compares each answer with a brute-force match over the store's
contents, read in the same quiet window (the store's generation unchanged around both). Prints a
JSON line ``{"checked": n, "skipped": n}``; exits non-zero at the first difference.

With ``sparse``, namespaces of more than 3 segments are indexed sparsely (heads of 2 tokens, a
tiny memory cap so that indexes are also dropped and started again): an answer must then lie
between what the sparse rule guarantees (:func:`sparse_floor`) and the brute-force match, and
name a chain that is stored and matches the prompt that far.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import prefixcache.catalog
import prefixcache.segment
from prefixcache.catalog import Catalog
from prefixcache.radix import Match, common_prefix_length
from prefixcache.segment import Pin, Segment, checksum, segment_key
from prefixcache.store import open_store

DIGEST = "c" * 64
NAMESPACES = ("a", "b")
KV = b"kv"


class Fingerprint:
    digest = DIGEST


def paths(segs: dict[str, Segment], root: str) -> dict[str, tuple[int, ...]]:
    """Full token path of every segment whose chain reaches the root (no hole)."""
    out: dict[str, tuple[int, ...]] = {}
    for key in segs:
        chain = []
        k = key
        while k in segs and k not in out:
            chain.append(k)
            k = segs[k].parent
        if k != root and k not in out:
            continue  # a hole in the chain: unreachable
        base = () if k == root else out[k]
        for c in reversed(chain):
            base = base + segs[c].tokens
            out[c] = base
    return out


def brute_match(store: Any, root: str, prompt: list[int]) -> Match:
    """What the index must answer, from every stored segment of ``root``."""
    segs = {s.key: s for s in store.segments() if s.root == root}
    full = paths(segs, root)
    common = {k: common_prefix_length(p, prompt) for k, p in full.items()}
    length = max(common.values(), default=0)
    cover = [k for k, n in common.items() if n == length and segs[k].start < length]
    if length == 0 or not cover:
        return Match(0, (), 0)
    best = min(cover, key=lambda k: (segs[k].end, k))
    chain = [best]
    while segs[chain[-1]].parent != root:
        chain.append(segs[chain[-1]].parent)
    return Match(length, tuple(reversed(chain)), segs[best].end)


def sparse_floor(store: Any, root: str, prompt: list[int], head: int) -> int:
    """The longest match a sparse index must find: over the segments whose ancestors the prompt
    matches whole and that it matches for at least their first ``head`` tokens (or all)."""
    segs = {s.key: s for s in store.segments() if s.root == root}
    full = paths(segs, root)
    best = 0
    for key, path in full.items():
        seg = segs[key]
        if common_prefix_length(path[: seg.start], prompt) < seg.start:
            continue  # an ancestor is not matched whole
        m = common_prefix_length(seg.tokens, prompt[seg.start :])
        if m >= min(head, len(seg.tokens)):
            best = max(best, seg.start + m)
    return best


def check_sparse(store: Any, root: str, prompt: list[int], got: Match, head: int) -> str | None:
    """Why a sparse answer is wrong, or None."""
    want = brute_match(store, root, prompt)
    floor = sparse_floor(store, root, prompt, head)
    if not floor <= got.length <= want.length:
        return f"length {got.length} outside [{floor}, {want.length}]"
    if not got.chain:
        return None if got.length == 0 else "a match without a chain"
    segs = {s.key: s for s in store.segments() if s.root == root}
    parent = root
    path: tuple[int, ...] = ()
    for key in got.chain:
        if key not in segs or segs[key].parent != parent:
            return f"chain {got.chain} is not stored"
        path += segs[key].tokens
        parent = key
    last = segs[got.chain[-1]]
    if common_prefix_length(path, prompt) < got.length or not last.start < got.length:
        return f"chain {got.chain} does not match {got.length} tokens"
    return None if got.chain_end == last.end else "wrong chain end"


def main() -> None:
    url, seed, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sparse = sys.argv[4:] == ["sparse"]
    head = prefixcache.segment.HEAD_TOKENS
    if sparse:
        head = prefixcache.segment.HEAD_TOKENS = prefixcache.catalog.HEAD_TOKENS = 2
        prefixcache.catalog.FULL_LISTING_MAX = 3
        prefixcache.catalog.SPARSE_MAX_TOKENS = 24
    rng = random.Random(seed)
    store = open_store(url)
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    checked = skipped = sparse_lookups = 0
    for _ in range(iterations):
        ns = rng.choice(NAMESPACES)
        root = catalog.root(ns)
        segs = [s for s in store.segments() if s.root == root]
        op = rng.random()
        if op < 0.6 or not segs:
            parent = rng.choice(segs) if segs and rng.random() < 0.8 else None
            tokens = tuple(rng.choices((1, 2, 3), k=rng.randint(1, 4)))
            p = root if parent is None else parent.key
            seg = Segment(
                key=segment_key(p, tokens),
                parent=p,
                root=root,
                start=0 if parent is None else parent.end,
                tokens=tokens,
                nbytes=len(KV),
                checksum=checksum(KV),
                fingerprint=DIGEST,
                namespace=ns,
                created=time.time(),
            )
            store.put(seg, KV)
        elif op < 0.85:
            store.delete(rng.choice(segs).key)
        elif op < 0.95:
            target = rng.choice(segs)
            store.set_pin(Pin(f"p{rng.randrange(3)}", target.key, root, target.end, time.time()))
        else:
            store.delete_pin(root, f"p{rng.randrange(3)}")
        for _ in range(3):
            ns = rng.choice(NAMESPACES)
            root = catalog.root(ns)
            prompt = rng.choices((1, 2, 3), k=rng.randint(1, 14))
            before = store.generation()
            want = brute_match(store, root, prompt)
            known = catalog.sync(ns, prompt)
            got = known.index.match(prompt)
            sparse_lookups += known.sparse
            wrong = None
            if sparse:
                wrong = check_sparse(store, root, prompt, got, head)
            elif got != want:
                wrong = f"index {got}, store {want}"
            if store.generation() != before:
                skipped += 1  # the other process wrote meanwhile: no fixed answer to compare
                continue
            if wrong is not None:
                raise SystemExit(f"namespace {ns!r}, prompt {prompt}: {wrong}")
            checked += 1
    store.close()
    print(json.dumps({"checked": checked, "skipped": skipped, "sparse": sparse_lookups}))


if __name__ == "__main__":
    main()
