"""Fault injection: SIGKILL writers at random moments, then check the store is whole."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SYSTEM

from prefixcache import DiskStore
from prefixcache.segment import checksum

WORKER = Path(__file__).parent / "workers" / "churn.py"
TRIALS = 30
MODES = ("prewarm", "autosave", "gc")


def start(store: Path, mode: str, seed: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(store), mode, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"worker failed to start: {line!r}"
    return proc


def check_store(path: Path) -> tuple[int, int]:
    """Every visible segment is complete, checksummed and chained; returns (segments, bytes)."""
    store = DiskStore(path)
    try:
        segments = {s.key: s for s in store.segments()}
        for seg in segments.values():
            buf = bytearray(seg.nbytes)
            store.read_kv(seg, memoryview(buf))
            assert checksum(buf) == seg.checksum, f"segment {seg.key} is torn"
            assert seg.parent == seg.root or seg.parent in segments, "a chain has a hole"
        for pin in store.pins():
            assert pin.key in segments, "a pin points at a missing segment"
        store.gc()
        rows = list(store._cache.iterkeys())
        kv = {k[3:] for k in rows if k.startswith("kv:")}
        assert kv == set(segments), "orphaned bytes survived gc"
        assert store.total_bytes() == sum(s.nbytes for s in segments.values())
        return len(segments), store.total_bytes()
    finally:
        store.close()


def test_sigkill_at_random_points_leaves_a_whole_store(tmp_path, open_cache, cold_reply):
    store = tmp_path / "store"
    rng = random.Random(1234)
    failures = []
    sizes = []
    for trial in range(TRIALS):
        mode = MODES[trial % len(MODES)]
        proc = start(store, mode, seed=trial)
        time.sleep(rng.uniform(0.05, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            sizes.append(check_store(store))
        except AssertionError as exc:  # collect, so the report shows every failing trial
            failures.append(f"trial {trial} ({mode}): {exc}")
    assert not failures, "\n".join(failures)
    assert max(n for n, _ in sizes) > 0, "the workers never got to write anything"
    # After all that, the store still serves correct output.
    messages = [SYSTEM, {"role": "user", "content": "What wood is best outdoors?"}]
    reply = open_cache().chat(messages, max_tokens=16, temperature=0)
    assert reply["choices"][0]["message"]["content"] == cold_reply(messages, max_tokens=16)
