"""One of several processes writing to one store at random while checking every lookup.

Usage: index_worker.py STORE_URL SEED ITERATIONS. Each iteration puts a segment (chained onto a
random stored one, over a three-token alphabet so that prompts share and leave prefixes
everywhere), deletes one (any, also one with children), or pins or unpins, then looks prompts up
through a Catalog and compares each answer with a brute-force match over the store's contents,
read in the same quiet window (the store's generation unchanged around both). Prints a JSON line
``{"checked": n, "skipped": n}``; exits non-zero at the first difference.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

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


def main() -> None:
    url, seed, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    store = open_store(url)
    catalog = Catalog(store, Fingerprint())  # type: ignore[arg-type]
    checked = skipped = 0
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
            got = catalog.sync(ns).index.match(prompt)
            if store.generation() != before:
                skipped += 1  # the other process wrote meanwhile: no fixed answer to compare
                continue
            if got != want:
                raise SystemExit(f"namespace {ns!r}, prompt {prompt}: index {got}, store {want}")
            checked += 1
    store.close()
    print(json.dumps({"checked": checked, "skipped": skipped}))


if __name__ == "__main__":
    main()
