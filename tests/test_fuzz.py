"""Differential fuzz: any order of calls, over two processes on one store, answers as a cold run.

Hypothesis draws a *program*: a small pool of conversations (shared heads, near-copies that differ
by one word in the middle, extensions, extensions with the model's own reply, branches, exact
repeats) and a sequence of operations on them (pin a head, chat, stream, complete, prepare
followed by ``llm.create_chat_completion`` on the cache's own Llama, unpin, rm, gc, reopen with
or without a new model, a quota small enough to evict). Two worker processes
(``tests/workers/fuzz_worker.py``) run the operations on one store; every answer is compared with
a cold llama-cpp-python run (greedy: content and ``usage.prompt_tokens``). A crash, a hang, a
quarantined segment or a different answer fails the example, and hypothesis shrinks the program
to a minimal one, printed both as a listing and as a literal to paste into a regression test.

Knobs: ``--fuzz-runs N`` (or ``PREFIXCACHE_FUZZ_RUNS``) examples instead of the CI default;
``--fuzz-seed random`` (or ``PREFIXCACHE_FUZZ_SEED``) draws new programs (the default seed 0
draws the same ones at every run, so that the suite's verdict is repeatable: exploring is a soak);
``--fuzz-store redis`` (or ``PREFIXCACHE_FUZZ_STORE=redis``) runs the workers on a tiered store
over a real redis-server that the program may kill and restart mid-run.
"""

from __future__ import annotations

import json
import os
import pprint
import random
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from workers.fuzz_worker import N_BATCH, N_CTX, N_THREADS

from prefixcache.errors import TemplateError
from prefixcache.template import ChatTemplate

WORKER = Path(__file__).parent / "workers" / "fuzz_worker.py"

#: Programs in the default (CI) run: about 5 minutes on 2 cores (60 programs, ~450 operations).
DEFAULT_RUNS = 60
#: Operations come in runs of 1 to 4 on one conversation (a chat, then a pin of its head, ...),
#: up to 6 runs: longer programs than one flat list of hypothesis's average size, and still
#: shrinkable by deleting whole runs or single operations.
MAX_RUNS, MAX_RUN_OPS = 6, 4
MAX_CONVS = 4  # few, so that operations often meet the same conversation again
REPLY_TOKENS = 16  # the length of the model's own replies that "reply" conversations carry
PIN_NAMES = ("a", "b", "c")
QUOTAS_MB = (None, 4.0, 12.0, 60.0)  # 64 tokens of SmolLM2 KV are 1.5 MB; a head 1.6-3.9 MB
#: Segment lengths: short ones chain several segments per conversation; the default (1024)
#: stores a conversation as one segment, so shared heads are split out of longer segments.
SEGMENT_TOKENS = (64, 160, 1024)
#: Context sizes: in 512 and 256 tokens conversations come near the end of the context
#: (restores into a nearly full KV cache, prompts that do not fit with their max_tokens).
CONTEXTS = (N_CTX, 512, 256)
#: What an operation may refuse without it being a failure.
ALLOWED_ERRORS = {"pin": {"QuotaExceededError"}}
ANSWER_TIMEOUT_S = 180.0

WORDS = (  # noqa: SIM905 (one word list, readable)
    "timber oak pine cedar birch maple walnut spruce plank board beam post rail nail screw "
    "bolt washer hinge bracket drill saw hammer chisel clamp sander paint primer varnish "
    "brush roller ladder hose rake spade seed soil fence gate shed deck tile grout pipe "
    "valve tap cable switch socket bulb glue tape rope chain hook shelf door window frame "
    "lock key"
).split()


# text ---------------------------------------------------------------------------------------
# The regression tests at the end name conversations by these seeds: a change to the texts
# changes them too (check that each still fails on the code from before its fix).


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def head_text(seed: int) -> str:
    """A system prompt of 60 to 119 words (about 95 to 180 tokens), the same for one seed.

    Short, because prefill is what the fuzz spends its time on (about 150 tokens a second on one
    core), and each shrinking step runs the program again; but longer than the 64 tokens below
    which the cache duplicates a shared head instead of splitting it out of a longer segment.
    """
    return f"You are the assistant of shop number {seed}. Stock list: " + words(
        1000 + seed, 60 + (seed * 37) % 60
    )


def user_text(seed: int) -> str:
    return f"Question {seed}: do you have " + words(2000 + seed, 4 + seed % 30) + "?"


def assistant_text(seed: int) -> str:
    return "We have " + words(3000 + seed, 3 + seed % 20) + "."


# programs -----------------------------------------------------------------------------------

#: Kinds of conversation recipe (hypothesis shrinks towards the first).
CONV_KINDS = ("new", "branch", "extend", "reply", "near")


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Conversation recipes; each one after the first may derive from an earlier one.

    ``("new", head, user)``: a system head and one question (heads 0-2 recur, so shared heads
    are common); ``("branch", j, user)``: conversation j with its last question replaced;
    ``("extend", j, answer, user)``: j plus an answer and a question; ``("reply", j, user)``: j
    plus the model's own (cold, greedy) reply to j and a question; ``("near", j, message, word,
    new)``: j with one word of one message replaced, a near-copy that differs in the middle.
    Seeds come from small ranges: each value the shrinker tries costs a run of the program.
    """
    n = draw(st.integers(1, MAX_CONVS))
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        kind = draw(st.sampled_from(CONV_KINDS[:1] if i == 0 else CONV_KINDS))
        j = draw(st.integers(0, i - 1)) if i else 0
        user = draw(st.integers(0, 29))
        if kind == "new":
            out.append(("new", draw(st.integers(0, 2) | st.integers(3, 29)), user))
        elif kind in ("branch", "reply"):
            out.append((kind, j, user))
        elif kind == "extend":
            out.append(("extend", j, draw(st.integers(0, 29)), user))
        else:
            message = draw(st.integers(0, 7))
            word = draw(st.integers(0, 63))
            out.append(("near", j, message, word, draw(st.integers(0, len(WORDS) - 1))))
    return out


#: Operation kinds, repeated for weight (hypothesis shrinks towards the first).
OP_KINDS = (
    *["chat"] * 4,
    "complete",
    "prepare",
    *["pin"] * 3,
    "unpin",
    "rm",
    "gc",
    "reopen",
)


@st.composite
def operation(draw: st.DrawFn, conv: int, redis: bool) -> dict[str, Any]:
    """One operation; those that take a conversation take ``conv``."""
    kinds = OP_KINDS + (("redis_kill", "redis_start") if redis else ())
    kind = draw(st.sampled_from(kinds))
    if kind in ("redis_kill", "redis_start"):
        return {"op": kind}
    op: dict[str, Any] = {"proc": draw(st.integers(0, 1)), "op": kind}
    if kind in ("chat", "complete", "prepare", "pin"):
        op["conv"] = conv
    if kind in ("chat", "complete", "prepare"):
        op["max_tokens"] = draw(st.sampled_from((8, 16)))
    if kind == "chat":
        op["stream"] = draw(st.booleans())
    elif kind == "complete":
        op["rendered"] = draw(st.booleans())  # the chat's own text (shares its tokens) or raw
    elif kind == "pin":
        # The first N messages: the head (the system prompt), all of them, or some.
        op["messages"] = draw(st.just(1) | st.just(8) | st.integers(2, 7))
    if kind in ("pin", "unpin", "rm"):
        op["name"] = draw(st.sampled_from(PIN_NAMES))
    if kind == "reopen":
        op["new_model"] = draw(st.booleans())
        op["quota_mb"] = draw(st.sampled_from(QUOTAS_MB))
    # Sent without waiting for the answer: runs at the same time as what follows on the other
    # process (the answer is collected before this process's next operation).
    if kind != "reopen" and draw(st.integers(0, 4)) == 4:
        op["overlap"] = True
    return op


@st.composite
def run_of_operations(draw: st.DrawFn, n_convs: int, redis: bool) -> list[dict[str, Any]]:
    conv = draw(st.integers(0, n_convs - 1))
    return draw(st.lists(operation(conv, redis), min_size=1, max_size=MAX_RUN_OPS))


@st.composite
def programs(draw: st.DrawFn, redis: bool = False) -> dict[str, Any]:
    convs = draw(conversations())
    runs = draw(st.lists(run_of_operations(len(convs), redis), min_size=1, max_size=MAX_RUNS))
    ops = [o for run in runs for o in run]
    return {
        "quota_mb": draw(st.sampled_from(QUOTAS_MB)),
        "segment_tokens": draw(st.sampled_from(SEGMENT_TOKENS)),
        "n_ctx": draw(st.sampled_from(CONTEXTS)),
        "convs": convs,
        "ops": ops,
    }


def resolve(convs: list[tuple[Any, ...]], cold: Cold) -> list[list[dict[str, str]]]:
    """The messages of each conversation recipe (replies come from the cold reference)."""
    out: list[list[dict[str, str]]] = []
    for spec in convs:
        kind = spec[0]
        if kind == "new":
            msgs = [
                {"role": "system", "content": head_text(spec[1])},
                {"role": "user", "content": user_text(spec[2])},
            ]
        elif kind == "branch":
            msgs = [*out[spec[1]][:-1], {"role": "user", "content": user_text(spec[2])}]
        elif kind == "extend":
            msgs = [
                *out[spec[1]],
                {"role": "assistant", "content": assistant_text(spec[2])},
                {"role": "user", "content": user_text(spec[3])},
            ]
        elif kind == "reply":
            base = out[spec[1]]
            reply = cold.chat(base, REPLY_TOKENS)[0] or ""
            msgs = [
                *base,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": user_text(spec[2])},
            ]
        else:
            _, j, m, w, new = spec
            msgs = [dict(x) for x in out[j]]
            at = m % len(msgs)
            text = msgs[at]["content"].split(" ")
            # Never the first or last word: a change in the middle of the message.
            pos = 1 + w % max(1, len(text) - 2)
            pos = min(pos, len(text) - 1)
            text[pos] = WORDS[new] if WORDS[new] != text[pos] else WORDS[(new + 1) % len(WORDS)]
            msgs[at]["content"] = " ".join(text)
        out.append(msgs)
    return out


def describe(program: dict[str, Any]) -> str:
    """The program as a readable listing (hypothesis prints the literal as well)."""
    lines = [
        f"quota_mb={program['quota_mb']} segment_tokens={program['segment_tokens']} "
        f"n_ctx={program.get('n_ctx', N_CTX)}",
        "conversations:",
    ]
    for i, spec in enumerate(program["convs"]):
        args = ", ".join(
            f"c{a}" if k == 1 and spec[0] != "new" else str(a) for k, a in enumerate(spec[1:], 1)
        )
        lines.append(f"  c{i} = {spec[0]}({args})")
    lines.append("operations:")
    for i, op in enumerate(program["ops"]):
        rest = {k: v for k, v in op.items() if k not in ("proc", "op", "conv")}
        where = f"p{op['proc']} " if "proc" in op else ""
        conv = f" c{op['conv']}" if "conv" in op else ""
        extra = " ".join(f"{k}={v!r}" for k, v in rest.items())
        lines.append(f"  #{i} {where}{op['op']}{conv} {extra}".rstrip())
    return "\n".join(lines)


# the cold reference -------------------------------------------------------------------------


class Cold:
    """Greedy answers of a plain Llama with an empty KV cache (what users get without us).

    Each answer is ``(content, prompt_tokens)``; content is None when the prompt and its
    max_tokens do not fit in the context (llama-cpp-python then shortens max_tokens, prefixcache
    raises PromptTooLongError: the fuzz expects the error).
    """

    def __init__(self, model_path: Path, n_ctx: int = N_CTX):
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            str(model_path),
            n_ctx=n_ctx,
            n_batch=N_BATCH,
            n_threads=N_THREADS,
            n_threads_batch=N_THREADS,
            verbose=False,
            chat_format="chat_template.default",
        )
        self.n_ctx = self.llm.n_ctx()  # as the cache sees it (llama.cpp may round it up)
        self.template = ChatTemplate(self.llm)
        self._memo: dict[str, tuple[str | None, int]] = {}

    def chat(
        self, messages: list[dict[str, str]], max_tokens: int, *, strict: bool = True
    ) -> tuple[str | None, int]:
        """``strict``: as PrefixCache.chat, which refuses what llama-cpp-python shortens."""
        key = json.dumps(["chat", messages, max_tokens])
        n_prompt = len(self.template.tokens(messages))
        if n_prompt + (max_tokens if strict else 1) > self.n_ctx:
            return None, n_prompt
        if key not in self._memo:
            self.llm.reset()
            out = self.llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0
            )
            content = out["choices"][0]["message"]["content"] or ""
            self._memo[key] = (content, out["usage"]["prompt_tokens"])
        return self._memo[key]

    def complete(self, prompt: str, max_tokens: int) -> tuple[str | None, int]:
        key = json.dumps(["complete", prompt, max_tokens])
        n_prompt = len(self.llm.tokenize(prompt.encode("utf-8"), special=True))
        if n_prompt + max_tokens > self.n_ctx:
            return None, n_prompt
        if key not in self._memo:
            self.llm.reset()
            out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
            self._memo[key] = (out["choices"][0]["text"], out["usage"]["prompt_tokens"])
        return self._memo[key]

    def pin_too_long(self, messages: list[dict[str, str]]) -> bool:
        """Whether pinning ``messages`` is refused with PromptTooLongError (as a prompt is: its
        prefix and one token to generate must fit the context)."""
        try:
            return len(self.template.prefix_tokens(messages)) + 1 > self.n_ctx
        except TemplateError:  # no stable prefix: the pin fails as the cache's template does
            return False

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text create_chat_completion evaluates for ``messages``."""
        return self.template.render(messages)


# the worker processes -----------------------------------------------------------------------


class Proc:
    """A fuzz_worker.py process: one JSON command in, one JSON answer out."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.log = log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.pending: tuple[int, dict[str, Any], Any] | None = None
        if self._line(120) != "ready":
            raise RuntimeError(f"fuzz worker did not start: {self.log_tail()}")

    def _line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return line.strip() or None

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: recv() reports that

    def recv(self, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any] | None:
        """The answer, or None when the process died or hung (it is killed then)."""
        line = self._line(timeout)
        if line is None:
            self.kill()
            return None
        result: dict[str, Any] = json.loads(line)
        return result

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()


class Fleet:
    """The two worker processes, restarted when one dies or hangs."""

    def __init__(self, log_dir: Path, n: int = 2):
        self.log_dir = log_dir
        self.procs = [Proc(log_dir / f"worker{i}.log") for i in range(n)]

    def proc(self, i: int) -> Proc:
        if not self.procs[i].alive:
            self.procs[i].close()
            self.procs[i] = Proc(self.log_dir / f"worker{i}.log")
        return self.procs[i]

    def close(self) -> None:
        for p in self.procs:
            p.close()


# running a program --------------------------------------------------------------------------


@dataclass
class Totals:
    counts: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        c = self.counts
        return (
            f"fuzz: {c['examples']} programs, {c['operations']} operations, "
            f"{c['answers']} answers compared, {c['mismatches']} mismatches, "
            f"{c['crashes']} crashes, {c['quarantines']} quarantined, "
            f"{c['over_quota']} pins over the quota, "
            f"{c['refused']} pins refused by the quota, "
            f"{c['too_long']} prompts too long (refused as expected), "
            + (f"{c['redis_kills']} redis-server kills, " if c["redis_kills"] else "")
            + f"{time.monotonic() - self.started:.0f} s"
        )


class Failure(AssertionError):
    """A program's answer differed from a cold run, or a worker crashed, hung or quarantined."""

    program: dict[str, Any]  # the program up to the failing operation


# One class per kind: hypothesis tells bugs apart by exception type (and where it is raised),
# so a mismatch and a crash found in one run are shrunk and reported separately.
class Mismatch(Failure):
    """An answer (content or prompt_tokens) differs from the cold run's."""


class Crash(Failure):
    """An operation raised an error it may not raise, or the worker died or hung."""


class Quarantine(Failure):
    """A valid segment was quarantined (nothing in the fuzz corrupts any)."""


class OverQuota(Failure):
    """A pin succeeded, and the pinned segments now hold more bytes than the pinner's quota."""


FAILURES = {
    "crashes": Crash,
    "mismatches": Mismatch,
    "quarantines": Quarantine,
    "over_quota": OverQuota,
}


class Redis:
    """The redis-server of the redis variant, and whether the program has it down."""

    def __init__(self, workdir: Path):
        from test_redis import RedisServer

        self.server = RedisServer(workdir)
        self.up = True

    def kill(self) -> None:
        self.server.kill()
        self.up = False

    def start(self) -> None:
        if not self.up:
            self.server.start()
            self.up = True


@dataclass
class Run:
    """One program on the fleet: sends operations, checks answers, counts."""

    program: dict[str, Any]
    fleet: Fleet
    cold: Cold
    stores: list[str]  # store path or URL for each process
    totals: Totals
    redis: Redis | None = None
    messages: list[list[dict[str, str]]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    opened: dict[int, Proc] = field(default_factory=dict)  # each process opens at first use
    sent: int = -1  # index of the last operation started

    def run(self) -> None:
        self.totals.counts["examples"] += 1
        self.messages = resolve(self.program["convs"], self.cold)
        try:
            for index, op in enumerate(self.program["ops"]):
                self.sent = index
                self.totals.counts["operations"] += 1
                if op["op"] == "redis_kill":
                    assert self.redis is not None
                    self.redis.kill()
                    self.totals.counts["redis_kills"] += 1
                    self.trace.append(f"#{index} redis-server killed")
                elif op["op"] == "redis_start":
                    assert self.redis is not None
                    self.redis.start()
                    self.trace.append(f"#{index} redis-server started (empty)")
                else:
                    self._call(index, op, self._command(op))
            for i in range(len(self.fleet.procs)):
                self._collect(i)
        finally:
            for proc in self.fleet.procs:
                if proc.pending is not None:  # a failure elsewhere: drain the answer
                    proc.pending = None
                    proc.recv()
            if self.redis is not None:
                self.redis.start()

    def _open_cmd(self, i: int) -> dict[str, Any]:
        return {
            "op": "open",
            "store": self.stores[i],
            "quota_mb": self.program["quota_mb"],
            "segment_tokens": self.program["segment_tokens"],
            "n_ctx": self.program.get("n_ctx", N_CTX),
        }

    def _command(self, op: dict[str, Any]) -> dict[str, Any]:
        kind = op["op"]
        cmd: dict[str, Any] = {"op": kind}
        if "conv" in op:
            msgs = self.messages[op["conv"]]
            if kind == "pin":
                cmd["messages"] = msgs[: min(op["messages"], len(msgs))]
            elif kind == "complete":
                cmd["prompt"] = self._prompt(op)
            else:
                cmd["messages"] = msgs
        for key in ("max_tokens", "stream", "name", "new_model", "quota_mb"):
            if key in op:
                cmd[key] = op[key]
        return cmd

    def _prompt(self, op: dict[str, Any]) -> str:
        msgs = self.messages[op["conv"]]
        if op["rendered"]:
            return self.cold.render(msgs)
        return "\n\n".join(m["content"] for m in msgs) + "\n\nAnswer:"

    def _call(self, index: int, op: dict[str, Any], cmd: dict[str, Any]) -> None:
        i = op["proc"]
        self._collect(i)
        proc = self.fleet.proc(i)
        if self.opened.get(i) is not proc:
            self.opened[i] = proc
            self._call(-1, {"proc": i, "op": "open"}, self._open_cmd(i))
        proc.send(cmd)
        proc.pending = (index, op, cmd)
        if not op.get("overlap"):
            self._collect(i)

    def _collect(self, i: int) -> None:
        proc = self.fleet.procs[i]
        if proc.pending is None:
            return
        index, op, cmd = proc.pending
        proc.pending = None
        self._check(index, op, cmd, proc.recv(), proc)

    def _fail(self, kind: str, index: int, op: dict[str, Any], detail: str) -> None:
        """Count the failure and end the program with it (hypothesis then shrinks it)."""
        self.totals.counts[kind] += 1
        where = "open" if index < 0 else f"#{index}"
        trace = "\n  ".join(self.trace)
        # The operations after the last one sent cannot matter: leave them out of the literal,
        # so that it is minimal even when hypothesis ran out of time shrinking.
        ran = {**self.program, "ops": self.program["ops"][: self.sent + 1]}
        exc = FAILURES[kind](
            f"at {where} {op}: {detail}\ntrace:\n  {trace}\n"
            f"the program up to the failure:\n{pprint.pformat(ran, width=100, sort_dicts=False)}"
        )
        exc.program = ran
        raise exc

    def _check(
        self,
        index: int,
        op: dict[str, Any],
        cmd: dict[str, Any],
        answer: dict[str, Any] | None,
        proc: Proc,
    ) -> None:
        kind = op["op"]
        if answer is None:
            self._fail("crashes", index, op, "the worker died or hung:\n" + proc.log_tail())
            return
        logs = answer.get("logs", [])
        self.trace.append(f"#{index} p{op['proc']} {kind}: " + _summary(answer))
        bad = [r for r in logs if "corrupt" in r or "quarantin" in r]
        if bad or answer.get("corrupt"):
            self._fail("quarantines", index, op, f"a valid segment was quarantined: {bad}")
        expected: tuple[str | None, int] | None = None
        if kind == "complete":
            expected = self.cold.complete(cmd["prompt"], cmd["max_tokens"])
        elif kind in ("chat", "prepare"):
            # prepare + create_chat_completion is llama-cpp-python's call: max_tokens shortened.
            strict = kind == "chat"
            expected = self.cold.chat(cmd["messages"], cmd["max_tokens"], strict=strict)
        pin_too_long = kind == "pin" and self.cold.pin_too_long(cmd["messages"])
        if not answer["ok"]:
            if answer["error"] in ALLOWED_ERRORS.get(kind, ()):
                self.totals.counts["refused"] += 1
                return
            too_long = ("PromptTooLongError", "ValueError" if kind == "prepare" else "")
            refusable = pin_too_long or (expected is not None and expected[0] is None)
            if refusable and answer["error"] in too_long:
                self.totals.counts["too_long"] += 1
                return
            self._fail("crashes", index, op, f"{answer['error']}: {answer['traceback']}")
        if kind == "pin":
            if pin_too_long:
                self._fail("crashes", index, op, "pinned a prefix the context cannot hold")
            self._check_pin(index, op, answer)
        if expected is None:
            return
        got = (answer["content"], answer["prompt_tokens"])
        self.totals.counts["answers"] += 1
        if expected[0] is None:
            self._fail("mismatches", index, op, f"answered {got!r}: expected PromptTooLongError")
        if got != expected:
            self._fail(
                "mismatches",
                index,
                op,
                f"got {got!r}, a cold run gives {expected!r} (cached={answer.get('cached')})",
            )
        cached = answer.get("cached")
        if cached is not None and not 0 <= cached < answer["prompt_tokens"]:
            self._fail("mismatches", index, op, f"cached_tokens={cached} of {got[1]}")

    def _check_pin(self, index: int, op: dict[str, Any], answer: dict[str, Any]) -> None:
        """Pinning past the quota is an error: after a pin, pins fit in the pinner's quota.

        Checked only when no operation of the other process is in flight (pins of two names
        racing each other are not serialised, and a lost race is not what this looks for).
        """
        quota, pinned = answer["quota_bytes"], answer["pinned_bytes"]
        if quota is None or pinned <= quota:
            return
        if any(p.pending is not None for p in self.fleet.procs):
            return
        self._fail("over_quota", index, op, f"{pinned} bytes pinned, quota {quota}")


def _summary(answer: dict[str, Any]) -> str:
    if not answer["ok"]:
        return f"{answer['error']}: {answer['message'][:200]}"
    keys = [k for k in answer if k not in ("ok", "logs", "corrupt")]
    text = ", ".join(f"{k}={answer[k]!r}" for k in keys)
    if answer.get("logs"):
        text += f" logs={answer['logs']}"
    return text


def minimize(
    program: dict[str, Any], kind: type[Failure], run: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Delete operations one at a time, last first, while ``kind`` of failure remains; then
    drop the conversations nothing uses.

    Hypothesis shrinks first, but gives up after five minutes, which is only a few dozen runs
    of a program here; this pass costs one run per operation and leaves none that is not needed.
    """

    def fails(candidate: dict[str, Any]) -> bool:
        try:
            run(candidate)
        except kind:
            return True
        except Failure:
            return False
        return False

    ops = list(program["ops"])
    for i in reversed(range(len(ops))):
        fewer = ops[:i] + ops[i + 1 :]
        if fewer and fails({**program, "ops": fewer}):
            ops = fewer
    smaller = _prune_conversations({**program, "ops": ops})
    return smaller if smaller != program and fails(smaller) else {**program, "ops": ops}


def _prune_conversations(program: dict[str, Any]) -> dict[str, Any]:
    """The program without conversations that no operation uses, directly or as a base."""
    convs = program["convs"]
    used = {op["conv"] for op in program["ops"] if "conv" in op}
    for i in sorted(used, reverse=True):
        todo = [i]
        while todo:
            spec = convs[todo.pop()]
            if spec[0] != "new" and spec[1] not in used:
                used.add(spec[1])
                todo.append(spec[1])
    new_index = {old: new for new, old in enumerate(sorted(used))}
    kept = []
    for old in sorted(used):
        spec = convs[old]
        kept.append(spec if spec[0] == "new" else (spec[0], new_index[spec[1]], *spec[2:]))
    ops = [{**op, "conv": new_index[op["conv"]]} if "conv" in op else op for op in program["ops"]]
    return {**program, "convs": kept, "ops": ops}


# fixtures -----------------------------------------------------------------------------------


def _option(config: pytest.Config, name: str, env: str) -> Any:
    value = config.getoption(name, default=None)
    return value if value is not None else os.environ.get(env)


@pytest.fixture(scope="module")
def fuzz_runs(request: pytest.FixtureRequest) -> int:
    return int(_option(request.config, "--fuzz-runs", "PREFIXCACHE_FUZZ_RUNS") or DEFAULT_RUNS)


@pytest.fixture(scope="module")
def fuzz_seed(request: pytest.FixtureRequest) -> int | None:
    """The programs' seed: fixed unless asked for 'random' (CI's run is then repeatable)."""
    text = str(_option(request.config, "--fuzz-seed", "PREFIXCACHE_FUZZ_SEED") or "0")
    if text == "random":
        return None
    if not text.isdigit():
        raise pytest.UsageError(f"--fuzz-seed must be a number or 'random', not {text!r}")
    return int(text)


@pytest.fixture(scope="module")
def fuzz_store(request: pytest.FixtureRequest) -> str:
    kind = str(_option(request.config, "--fuzz-store", "PREFIXCACHE_FUZZ_STORE") or "disk")
    if kind not in ("disk", "redis"):
        raise pytest.UsageError(f"--fuzz-store must be disk or redis, not {kind!r}")
    return kind


@pytest.fixture(scope="module")
def colds(model_path: Path) -> Callable[[int], Cold]:
    """The cold reference for a context size (the numbers depend on it)."""
    made: dict[int, Cold] = {}

    def get(n_ctx: int) -> Cold:
        if n_ctx not in made:
            made[n_ctx] = Cold(model_path, n_ctx)
        return made[n_ctx]

    return get


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fuzz-logs"))
    yield fleet
    fleet.close()


@pytest.fixture(scope="module")
def totals(request: pytest.FixtureRequest) -> Iterator[Totals]:
    totals = Totals()
    yield totals
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if totals.counts["examples"]:
        with capture.global_and_fixture_disabled():
            print("\n" + totals.line())


@pytest.fixture(scope="module")
def runner(
    fleet: Fleet,
    colds: Callable[[int], Cold],
    totals: Totals,
    fuzz_store: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Run one program on a fresh store (a new directory, or a new Redis key prefix)."""
    base = tmp_path_factory.mktemp("fuzz")
    redis = Redis(base / "redis") if fuzz_store == "redis" else None
    counter = iter(range(1 << 30))

    def run(program: dict[str, Any]) -> None:
        n = next(counter)
        where = Path(tempfile.mkdtemp(prefix=f"p{n}-", dir=base))
        if redis is None:
            stores = [str(where / "store")] * len(fleet.procs)
        else:
            stores = [
                redis.server.url(local=str(where / f"tier{i}"), retry_after="0.5", prefix=f"f{n}")
                for i in range(len(fleet.procs))
            ]
        cold = colds(program.get("n_ctx", N_CTX))
        Run(program, fleet, cold, stores, totals, redis).run()

    yield run
    if redis is not None:
        redis.server.kill()


# the tests ----------------------------------------------------------------------------------


def test_differential_fuzz(
    runner: Callable[[dict[str, Any]], None],
    fuzz_runs: int,
    fuzz_store: str,
    fuzz_seed: int | None,
):
    """Random programs on two processes and one store answer exactly as cold runs do."""

    @seed(fuzz_seed)
    @settings(
        max_examples=fuzz_runs,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(program=programs(redis=fuzz_store == "redis"))
    def check(program: dict[str, Any]) -> None:
        note(
            "program (paste into a test_regression_* with run(program)):\n"
            + pprint.pformat(program, width=100, sort_dicts=False)
        )
        note(describe(program))
        runner(program)

    try:
        check()
    except Exception as exc:
        found = [exc] if isinstance(exc, Failure) else list(getattr(exc, "exceptions", []))
        failures = [e for e in found if isinstance(e, Failure)]
        if not failures:
            raise
        lines = []
        for failure in failures:
            smallest = minimize(failure.program, type(failure), runner)
            lines += [
                f"{type(failure).__name__}, minimized (each operation is needed):",
                describe(smallest),
                pprint.pformat(smallest, width=100, sort_dicts=False),
            ]
        raise AssertionError("\n".join(lines)) from exc


# regressions the fuzz found, as plain tests ------------------------------------------------


def _chat(proc: int, conv: int = 0) -> dict[str, Any]:
    return {"proc": proc, "op": "chat", "conv": conv, "max_tokens": 8, "stream": False}


@pytest.mark.parametrize("pin_proc", [0, 1], ids=["same-process", "other-process"])
def test_regression_pin_after_chat(runner: Callable[[dict[str, Any]], None], pin_proc: int):
    """Pinning a head that an autosave stored inside a longer segment captured an empty span.

    Found by the fuzz (issue 12 item 1): ``ValueError: cannot capture [83, 83) of 83 live
    tokens`` from ``pin`` after a ``chat`` of the same conversation, in the same process or in
    another one on the store.
    """
    pin = {"proc": pin_proc, "op": "pin", "conv": 0, "messages": 1, "name": "a"}
    program = {
        "quota_mb": None,
        "segment_tokens": 1024,
        "convs": [("new", 0, 0)],
        "ops": [_chat(0), pin, _chat(0), _chat(1)],
    }
    runner(program)


def test_regression_pin_of_an_autosaved_chain_is_held_to_the_quota(
    runner: Callable[[dict[str, Any]], None],
):
    """Pinning a prefix that autosave had stored counted only the chain's last segment.

    Found by the fuzz: with an 8 MB quota, pinning the first 7 messages (398 tokens, 9.2 MB)
    alone is refused with QuotaExceededError, but after a chat of the conversation had stored
    its segments the same pin succeeded, and 9,177,672 bytes were pinned under the 8,000,000-byte
    quota (lifecycle.check_pin_quota counts the new segments and the last key, not the stored
    ancestors that the pin makes pinned too).
    """
    program = {
        "quota_mb": 8.0,
        "segment_tokens": 160,
        # 114 words of system prompt, then three long turns: 449 tokens in all.
        "convs": [
            ("new", 17, 29),
            ("extend", 0, 19, 28),
            ("extend", 1, 19, 29),
            ("extend", 2, 19, 27),
        ],
        "ops": [_chat(0, conv=3), {"proc": 0, "op": "pin", "conv": 3, "messages": 7, "name": "a"}],
    }
    runner(program)


def test_regression_a_pin_longer_than_the_context_is_refused(
    runner: Callable[[dict[str, Any]], None],
):
    """Found by the fuzz: pinning a 275-token prefix in a 256-token context is refused with
    PromptTooLongError, as a prompt is; the fuzz took the refusal for a crash."""
    program = {
        "quota_mb": None,
        "segment_tokens": 64,
        "n_ctx": 256,
        "convs": [("new", 1, 0), ("extend", 0, 0, 23), ("reply", 1, 0), ("reply", 2, 0)],
        "ops": [
            {"proc": 0, "op": "pin", "conv": 3, "messages": 8, "name": "a"},
            {"proc": 1, "op": "pin", "conv": 1, "messages": 8, "name": "b"},
            _chat(0, conv=1),
        ],
    }
    runner(program)
