"""Lookup cost against store size: synthetic segments, the real index path, disk and Redis.

    .venv/bin/python bench/lookup.py                       # 10k and 100k segments, both stores
    .venv/bin/python bench/lookup.py --segments 10000 --old /tmp/old-tree

No model is needed: the segments are metadata with a few bytes of "KV", and what is timed is the
real lookup path (``Catalog.sync(namespace, prompt).index.match(prompt)``, what
``PrefixCache.lookup`` runs under the model lock), on a real store opened the way the cache
opens it (``open_store``: a DiskStore, or a Redis store with its local tier). The store holds,
for ``N`` segments:

- namespaces ``agent-0`` and ``agent-1``: the 8k-token prompt as a chain of 8 segments of 1024
  tokens each, plus ``--own-share`` of ``N`` (default 1%, half in each) one-segment
  conversations of 64 tokens (``--own-share 1.0``: the looked-up namespaces hold the whole
  store, so each is far over ``FULL_LISTING_MAX`` and is indexed sparsely);
- the rest in 14 other namespaces: 64-token conversations (what other tenants and models hold).

Measured (medians), each in its own process: ``fresh``, the first lookup of a process that has
just opened the store; ``after write``, a lookup right after another process stored one segment
in the same namespace; ``steady``, a lookup with nothing changed; ``alternating``, lookups that
alternate between the two namespaces. ``rss`` is the fresh process's peak memory.

``--old DIR`` runs the same measurements with the ``prefixcache`` package of another checkout
(``git worktree add DIR <commit>``) on the same store and prints both side by side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 8192
CHAIN_SEGMENT = 1024
SMALL = 64
NAMESPACES = ("agent-0", "agent-1")
OTHER_NAMESPACES = 14
DIGEST = "b" * 64
KV = b"\0" * 16
ROLE_TIMEOUT_S = 1800


class _Fingerprint:
    """What the catalog reads of a model fingerprint (its digest): no model needed."""

    digest = DIGEST


def prompt(ns_index: int = 0) -> list[int]:
    rng = random.Random(1000 + ns_index)
    return [rng.randrange(1, 49152) for _ in range(PROMPT_TOKENS)]


def _segment(parent: str, root: str, start: int, tokens: list[int], ns: str) -> Any:
    from prefixcache.segment import Segment, checksum, segment_key

    return Segment(
        key=segment_key(parent, tokens),
        parent=parent,
        root=root,
        start=start,
        tokens=tuple(tokens),
        nbytes=len(KV),
        checksum=checksum(KV),
        fingerprint=DIGEST,
        namespace=ns,
        created=time.time(),
        label="bench",
    )


def populate(url: str, n: int, own_share: float = 0.01) -> None:
    """Fill the store at ``url`` with ``n`` segments laid out as the module docstring says."""
    from prefixcache.segment import root_key
    from prefixcache.store import open_store

    store = open_store(url)
    rng = random.Random(n)
    count = 0
    for i, ns in enumerate(NAMESPACES):
        root = root_key(DIGEST, ns)
        toks = prompt(i)
        parent = root
        for a in range(0, PROMPT_TOKENS, CHAIN_SEGMENT):
            seg = _segment(parent, root, a, toks[a : a + CHAIN_SEGMENT], ns)
            store.put(seg, KV)
            parent = seg.key
            count += 1
    own = max(1, int(n * own_share / 2))
    others = [f"other-{j}" for j in range(OTHER_NAMESPACES)]
    t0 = time.monotonic()
    small = 0
    while count < n:
        ns = NAMESPACES[small % 2] if small < 2 * own else others[small % len(others)]
        small += 1
        root = root_key(DIGEST, ns)
        toks = [rng.randrange(1, 49152) for _ in range(SMALL)]
        store.put(_segment(root, root, 0, toks, ns), KV)
        count += 1
        if count % 10000 == 0:
            print(f"  {count} segments ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    store.close()


# roles: each runs in a process of its own, with the prefixcache package under test -------------


def _lookup(catalog: Any, ns: str, toks: list[int]) -> float:
    # The prompt goes to sync (a sparse index reads its path); older checkouts take none.
    args = (ns, toks) if "tokens" in inspect.signature(catalog.sync).parameters else (ns,)
    t0 = time.perf_counter()
    match = catalog.sync(*args).index.match(toks)
    dt = time.perf_counter() - t0
    if match.length != PROMPT_TOKENS:
        raise SystemExit(f"lookup found {match.length} of {PROMPT_TOKENS} tokens in {ns}")
    return dt


def role_fresh(url: str) -> dict[str, Any]:
    from prefixcache.catalog import Catalog
    from prefixcache.store import open_store

    toks = prompt(0)
    store = open_store(url)
    catalog = Catalog(store, _Fingerprint())  # type: ignore[arg-type]
    seconds = _lookup(catalog, NAMESPACES[0], toks)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store.close()
    return {"fresh": seconds, "rss": rss}


def role_writer(url: str) -> None:
    """Store one new segment in ``agent-0`` for every line read; answer each with a line."""
    from prefixcache.segment import root_key
    from prefixcache.store import open_store

    store = open_store(url)
    root = root_key(DIGEST, NAMESPACES[0])
    rng = random.Random(os.getpid())
    for _ in sys.stdin:
        toks = [rng.randrange(1, 49152) for _ in range(SMALL)]
        store.put(_segment(root, root, 0, toks, NAMESPACES[0]), KV)
        print("ok", flush=True)
    store.close()


def role_warm(url: str, runs: int) -> dict[str, Any]:
    from prefixcache.catalog import Catalog
    from prefixcache.store import open_store

    toks = [prompt(0), prompt(1)]
    store = open_store(url)
    catalog = Catalog(store, _Fingerprint())  # type: ignore[arg-type]
    _lookup(catalog, NAMESPACES[0], toks[0])
    steady = [_lookup(catalog, NAMESPACES[0], toks[0]) for _ in range(runs)]
    alternating = [_lookup(catalog, NAMESPACES[i % 2], toks[i % 2]) for i in range(runs)]
    writer = subprocess.Popen(
        [sys.executable, __file__, "--role", "writer", "--url", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    after = []
    for _ in range(runs):
        writer.stdin.write("go\n")
        writer.stdin.flush()
        writer.stdout.readline()
        after.append(_lookup(catalog, NAMESPACES[0], toks[0]))
    writer.stdin.close()
    writer.wait()
    store.close()
    return {
        "steady": statistics.median(steady),
        "alternating": statistics.median(alternating),
        "after_write": statistics.median(after),
    }


# the orchestrator -------------------------------------------------------------------------------


def _run_role(pythonpath: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=ROLE_TIMEOUT_S,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"role {args} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(pythonpath: str, url: str, runs: int, fresh_runs: int) -> dict[str, Any]:
    fresh = [_run_role(pythonpath, "--role", "fresh", "--url", url) for _ in range(fresh_runs)]
    warm = _run_role(pythonpath, "--role", "warm", "--url", url, "--runs", str(runs))
    return {
        "fresh": statistics.median(f["fresh"] for f in fresh),
        "rss": statistics.median(f["rss"] for f in fresh),
        **warm,
    }


TARGETS = {"fresh": 0.020, "after_write": 0.005, "steady": 0.001}


def report(rows: list[dict[str, Any]]) -> str:
    cols = ["fresh", "after_write", "steady", "alternating"]
    lines = [
        "| store | segments | looked-up namespaces hold | code | "
        + " | ".join(c.replace("_", " ") + " (ms)" for c in cols)
        + " | rss (MB) |",
        "|" + " --- |" * (len(cols) + 5),
    ]
    for r in rows:
        cells = [f"{r[c] * 1e3:.2f}" for c in cols]
        lines.append(
            f"| {r['store']} | {r['segments']:,} | {r['own']:,} | {r['code']} | "
            + " | ".join(cells)
            + f" | {r['rss'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stores", nargs="+", default=["disk", "redis"])
    parser.add_argument("--runs", type=int, default=30, help="samples of the warm measurements")
    parser.add_argument("--fresh-runs", type=int, default=5, help="fresh processes")
    parser.add_argument(
        "--own-share", type=float, default=0.01, help="share of N in the looked-up namespaces"
    )
    parser.add_argument("--old", help="a checkout whose prefixcache to measure beside this one")
    parser.add_argument("--old-max", type=int, default=100_000, help="largest N for --old")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "fresh":
        print(json.dumps(role_fresh(args.url)))
        return
    if args.role == "warm":
        print(json.dumps(role_warm(args.url, args.runs)))
        return
    if args.role == "writer":
        role_writer(args.url)
        return
    here = str(Path(__file__).resolve().parent.parent)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pc-lookup-") as tmp:
        for n in args.segments:
            for kind in args.stores:
                work = Path(tmp) / f"{kind}-{n}"
                work.mkdir()
                redis_proc = None
                if kind == "redis":
                    from redis_ttft import start_redis  # the bench folder, as fleet.py does

                    redis_proc, port = start_redis(work)
                    url = f"redis://127.0.0.1:{port}/0?local={work / 'tier'}"
                else:
                    url = str(work / "store")
                try:
                    t0 = time.monotonic()
                    print(f"{kind}, {n:,} segments: filling", file=sys.stderr)
                    populate(url, n, args.own_share)
                    print(f"  filled in {time.monotonic() - t0:.0f}s", file=sys.stderr)
                    codes = [("new", here)]
                    if args.old and n <= args.old_max:
                        codes.append(("old", str(Path(args.old).resolve())))
                    for code, path in codes:
                        runs = args.runs if code == "new" else max(3, args.runs // 10)
                        fresh_runs = args.fresh_runs if code == "new" else 3
                        row = measure(path, url, runs, fresh_runs)
                        own = 2 * (len(range(0, PROMPT_TOKENS, CHAIN_SEGMENT)))
                        own += 2 * max(1, int(n * args.own_share / 2))
                        rows.append({"store": kind, "segments": n, "own": own, "code": code, **row})
                        print(report(rows[-1:]).splitlines()[-1], file=sys.stderr)
                finally:
                    if redis_proc is not None:
                        redis_proc.kill()
                        redis_proc.wait()
    print(report(rows))
    print("\ntargets at 100k:", ", ".join(f"{k} < {v * 1e3:g} ms" for k, v in TARGETS.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
