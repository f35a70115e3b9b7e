"""What authenticating a segment costs on restore: keyed BLAKE2b vs HMAC-SHA256 vs XXH3.

Every restore checksums a segment's bytes (XXH3-64); with a store key it also verifies a MAC over
them (prefixcache/integrity.py). This times each on one buffer the size of a 4k-token SmolLM2
segment chain (~95 MB, as in bench/results.md), in memory, and prints medians and the ratio to
XXH3. The faster cryptographic MAC is the one integrity.py uses; docs/security.md quotes the run.

    .venv/bin/python bench/integrity.py [--mb 95] [--runs 9] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import ssl
import statistics
import time
from collections.abc import Callable
from typing import Any

import xxhash

from prefixcache.integrity import Integrity
from prefixcache.segment import Segment, checksum, root_key, segment_key

KEY = b"k" * 32


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` over ``runs`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "?", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "sha_ni": " sha_ni" in flags,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "load_1m": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=95.0, help="buffer size in MB (1e6 bytes)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    nbytes = int(args.mb * 1e6)
    buf = memoryview(bytearray(os.urandom(nbytes)))  # a restore buffer is a bytearray view
    root = root_key("0" * 64)
    tokens = tuple(range(4096))
    seg = Segment(
        key=segment_key(root, tokens),
        parent=root,
        root=root,
        start=0,
        tokens=tokens,
        nbytes=nbytes,
        checksum=checksum(buf),
        fingerprint="0" * 64,
    )
    integrity = Integrity(KEY)
    signed = integrity.sign(seg, buf)

    methods: dict[str, Callable[[], object]] = {
        "xxh3-64 (checksum)": lambda: xxhash.xxh3_64_intdigest(buf),
        "blake2b keyed": lambda: hashlib.blake2b(buf, key=KEY, digest_size=32).digest(),
        "hmac-sha256": lambda: hmac.new(KEY, buf, "sha256").digest(),
        "Integrity.verify": lambda: integrity.verify(signed, buf),
    }
    medians = {name: timed(fn, args.runs) for name, fn in methods.items()}
    base = medians["xxh3-64 (checksum)"]
    rows = [
        {
            "method": name,
            "median_ms": round(t * 1e3, 2),
            "gb_per_s": round(nbytes / t / 1e9, 2),
            "vs_xxh3": round(t / base, 1),
        }
        for name, t in medians.items()
    ]
    report = {"bytes": nbytes, "runs": args.runs, "machine": cpu_info(), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(
        f"{nbytes / 1e6:.1f} MB, median of {args.runs} runs · {m['cpu']}, {m['cores']} cores, "
        f"sha_ni={'yes' if m['sha_ni'] else 'no'}, Python {m['python']}, {m['openssl']}, "
        f"load {m['load_1m']:.2f}"
    )
    print(f"{'method':<20} {'median':>10} {'GB/s':>7} {'vs xxh3':>8}")
    for r in rows:
        print(
            f"{r['method']:<20} {r['median_ms']:>7.1f} ms {r['gb_per_s']:>7.2f} "
            f"{r['vs_xxh3']:>7.1f}x"
        )


if __name__ == "__main__":
    main()
