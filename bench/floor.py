# ruff: noqa: RUF001 (the table uses the multiplication sign on purpose)
"""Time to first token against the floor, this tree beside another checkout, in one run.

Run: ``.venv/bin/python bench/floor.py --other /path/to/checkout-of-main [...] [--sizes 1024 4096]
[--reps 5]``. For each prefix size one store is pinned (the store format is shared), then fresh
processes of ``bench/_worker.py pc`` from each tree take turns on copies of it (so neither sees
the other's autosave). Each worker reports its TTFT and its own floor: a bare
``llama_state_seq_set_data`` of the prefix's bytes already in memory plus the suffix's evaluation.
Each worker starts once the machine is quiet and is taken again (twice at most) when other
processes used more than CONTENDED cores meanwhile, as in run.py. Ratios are compared within
this run only; the load average and the cores others used are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import load_llm, prefix_messages
from run import CONTENDED, LoadMonitor, wait_quiet

HERE = Path(__file__).resolve().parent


def run_worker(tree: Path, method: str, prompt: Path, d: Path, question: int) -> dict[str, Any]:
    """One fresh worker process, started once the machine is quiet (as run.py's are); the
    cores other processes used meanwhile are in ``foreign_cores``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "bench" / "_worker.py"), method, "--prompt", str(prompt)]
    cmd += ["--questions", str(question), "--dir", str(d)]
    wait_quiet(max_wait=60)
    busy, mine, wall = LoadMonitor._busy(), LoadMonitor._mine(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree / "bench")
    elapsed = time.perf_counter() - wall
    foreign = (LoadMonitor._busy() - busy) - (LoadMonitor._mine() - mine)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            result = dict(json.loads(line[len("@@RESULT ") :]))
            result["foreign_cores"] = max(0.0, foreign) / max(elapsed, 1e-9)
            return result
    raise RuntimeError(f"{method} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--other", required=True, nargs="+", help="checkouts to compare with (e.g. main)"
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 7800])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument(
        "--work", help="keep prompts and pinned stores here, reusing those already there"
    )
    args = parser.parse_args()
    trees = {Path(o).resolve().name: Path(o).resolve() for o in args.other}
    trees["this"] = HERE.parent
    tok = load_llm(vocab_only=True)
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefixcache-floor-") as tmp_name:
        tmp = Path(tmp_name)
        work = Path(args.work) if args.work else tmp
        for n in args.sizes:
            prompt = work / f"prompt-{n}.json"
            pinned = work / f"pinned-{n}"
            if not pinned.exists():
                prompt.write_text(json.dumps(prefix_messages(tok, n)))
                run_worker(trees["this"], "pc-populate", prompt, pinned, 0)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            for rep in range(args.reps):
                q = 1 + rep % 6
                order = list(trees)[rep % len(trees) :] + list(trees)[: rep % len(trees)]
                for name in order:
                    d = tmp / f"run-{name}"
                    shutil.rmtree(d, ignore_errors=True)
                    for _ in range(3):  # a run other processes disturbed is taken again
                        shutil.rmtree(d, ignore_errors=True)
                        shutil.copytree(pinned, d)
                        res = run_worker(trees[name], "pc", prompt, d, q)
                        if res["foreign_cores"] < CONTENDED:
                            break
                    run = res["runs"][0]
                    floor = res["raw_set_s"] + res["suffix_eval_s"]
                    runs[name].append(
                        {
                            "ttft": run["ttft_s"],
                            "floor": floor,
                            "ratio": run["ttft_s"] / floor,
                            "restore": run["restore_s"],
                            "prepare_restore": res["prepare_restore_s"],
                            "parts": res["restore_parts"],
                            "load": os.getloadavg()[0],
                            "foreign_cores": res["foreign_cores"],
                            "text": run["text"],
                        }
                    )
                    print(n, name, rep, json.dumps(runs[name][-1]), flush=True)
            raw[str(n)] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print("\n| prefix | tree | TTFT | floor | TTFT / floor | restore in TTFT | load avg | others |")
    print("|---|---|---|---|---|---|---|---|")
    for n, runs in raw.items():
        for name, rs in runs.items():

            def m(k: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(r[k] for r in rs)

            print(
                f"| {n} | {name} | {m('ttft') * 1e3:.1f} ms | {m('floor') * 1e3:.1f} ms | "
                f"{m('ratio'):.2f}× | {m('restore') * 1e3:.1f} ms | {m('load'):.1f} | "
                f"{m('foreign_cores'):.2f} cores |"
            )
        texts = [[r["text"] for r in rs] for rs in runs.values()]
        same = all(t == texts[0] for t in texts)
        print(f"| {n} | same output in every tree | {same} | | | | | |")


if __name__ == "__main__":
    main()
