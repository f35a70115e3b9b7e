"""Several agent processes share one store: one prefill, no torn reads, correct output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SYSTEM

from prefixcache import DiskStore

WORKERS = Path(__file__).parent / "workers"
QUESTIONS = ["Do you cut timber?", "When do you open?", "Do you sell paint?", "Any nails?"]


def test_four_processes_share_one_store(tmp_path: Path, cold_reply):
    store = tmp_path / "store"
    evictor = subprocess.Popen(
        [sys.executable, str(WORKERS / "evictor.py"), str(store)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert evictor.stdout is not None and evictor.stdout.readline().strip() == "ready"
    try:
        agents = [
            subprocess.Popen(
                [sys.executable, str(WORKERS / "agent.py"), str(store), q],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for q in QUESTIONS
        ]
        results = []
        for proc in agents:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        evictor.kill()
        evictor.wait()
    # The shared prefix was prefilled by exactly one process; the others restored it.
    evaluated = sorted(r["evaluated"] for r in results)
    assert evaluated[0] == evaluated[1] == evaluated[2] == 0 < evaluated[3]
    pinned = [p for p in DiskStore(store).pins() if p.name == "shared"]
    assert len(pinned) == 1
    for q, r in zip(QUESTIONS, results, strict=True):
        messages = [SYSTEM, {"role": "user", "content": q}]
        assert r["cached"] > 100
        assert r["corrupt"] == 0
        assert r["first"] == cold_reply(messages, max_tokens=16)
        follow = [
            *messages,
            {"role": "assistant", "content": r["first"]},
            {"role": "user", "content": "Why?"},
        ]
        assert r["second"] == cold_reply(follow, max_tokens=16)
