"""Formatters and rich tables for the ``prefixcache`` command's output.

Everything here only presents what a library call returned: sizes, durations, progress bars, the
prewarm/status/verify tables, the segment tree's branches and ``explain``'s report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .. import status as store_status
from ..cache import Calibration
from ..explain import Explanation
from ..prewarm import PrewarmResult
from .base import console


def fmt_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


def fmt_ago(when: float | None) -> str:
    return "—" if not when else fmt_duration(max(0.0, time.time() - when)) + " ago"


class TokenRate(ProgressColumn):
    """Tokens per second of a progress task."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.0f} tok/s", style="progress.data.speed")


def progress_bars(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TokenRate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=quiet,
    )


def recipe_bar(bars: Progress, name: str) -> Callable[[int, int], None]:
    """A prewarm progress callback that adds its bar on first use (skipped recipes get none)."""
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bars.add_task(name, total=total)
        bars.update(task, completed=done, total=total)

    return advance


def print_prewarm(results: list[PrewarmResult]) -> None:
    """One row per recipe: tokens evaluated, reused and stored now, and its state."""
    table = Table(title="prewarm", title_justify="left")
    table.add_column("recipe", no_wrap=True)
    for col in ("tokens", "evaluated", "reused", "stored now", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for r in results:
        state = "current" if r.skipped else ("stored" if r.evaluated_tokens else "restored")
        table.add_row(
            r.recipe,
            str(r.n_tokens),
            str(r.evaluated_tokens),
            str(r.reused_tokens),
            f"{fmt_size(r.new_bytes)} ({r.new_segments} seg)",
            f"{r.seconds:.1f}s",
            state if r.pinned else state + " (unpinned)",
        )
    console.print(table)


def print_status(report: store_status.StoreStatus) -> None:
    """The pins table with the store's totals as caption, notes, then the cost model."""
    models = sorted({row.model for row in report.pins})
    title = f"prefixcache store: {report.url}"
    if len(models) == 1:
        title += f" · model {models[0]}"
    table = Table(title=title, title_justify="left")
    table.add_column("recipe", no_wrap=True)
    for col in ("tokens", "bytes", "pinned", "TTL left", "hits", "last used"):
        table.add_column(col, justify="right", no_wrap=True)
    if len(models) > 1:
        table.add_column("model", no_wrap=True)
    for row in report.pins:
        name = row.name if not row.namespace else f"{row.name} [dim]({row.namespace[:8]})[/]"
        cells = [
            name if row.stored else f"{name} [red](evicted)[/]",
            str(row.tokens),
            fmt_size(row.bytes),
            "yes" if row.pinned else "[yellow]expired[/]",
            fmt_duration(row.ttl_left_s) if row.pinned else "—",
            str(row.hits),
            fmt_ago(row.last_used),
        ]
        table.add_row(*cells, *([row.model] if len(models) > 1 else []))
    quota = "no quota" if report.quota_bytes is None else f"quota {fmt_size(report.quota_bytes)}"
    table.caption = (
        f"{report.segments} segments, {report.tokens} tokens, {fmt_size(report.bytes)} "
        f"({fmt_size(report.pinned_bytes)} pinned, {fmt_size(report.autosaved_bytes)} in "
        f"{report.autosaved_segments} unpinned) · {quota}"
        + (f" · {report.quarantined} quarantined" if report.quarantined else "")
    )
    table.caption_justify = "left"
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")
    if report.models:
        figures = Table(title="cost model, measured on this machine", title_justify="left")
        figures.add_column("model", overflow="fold")
        figures.add_column("memory", no_wrap=True)
        for col in ("prefill", "restore", "KV/token", "min span saved"):
            figures.add_column(col, justify="right", no_wrap=True)
        for m in report.models:
            cal = Calibration(
                prefill_tokens_per_s=m.prefill_tokens_per_s,
                restore_bytes_per_s=m.restore_bytes_per_s,
                bytes_per_token=m.bytes_per_token,
            )
            figures.add_row(
                m.model,
                m.memory,
                f"{m.prefill_tokens_per_s:.0f} tok/s" if m.prefill_tokens_per_s else "—",
                f"{m.restore_bytes_per_s / 1e9:.2f} GB/s" if m.restore_bytes_per_s else "—",
                fmt_size(m.bytes_per_token) if m.bytes_per_token else "—",
                f"{cal.min_span_tokens()} tokens",
            )
        console.print(figures)


def print_problems(problems: list[store_status.Problem]) -> None:
    """What verify found, one row per segment."""
    table = Table(title="problems", title_justify="left")
    for col in ("segment", "label", "problem", "detail"):
        table.add_column(col)
    for p in problems:
        table.add_row(p.key[:16], p.label, p.kind, p.detail)
    console.print(table)


def add_branch(parent: Tree, node: store_status.TreeNode) -> None:
    seg = node.segment
    pins = f" [green]📌 {', '.join(node.pins)}[/]" if node.pins else ""
    label = f" [dim]{seg.label}[/]" if seg.label and not node.pins else ""
    kind = " · checkpoint" if node.checkpoint else ""
    branch = parent.add(
        f"[{seg.start}, {seg.end}) {len(seg.tokens)} tok · {fmt_size(seg.nbytes)}{kind} · "
        f"{node.hits} hits{pins}{label}"
    )
    for child in node.children:
        add_branch(branch, child)


def shown(text: str) -> Text:
    """Decoded prompt text with its newlines and tabs visible, never read as rich markup."""
    return Text(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t"))


def print_explanation(e: Explanation) -> None:
    """The reason line, the divergence (position and text on both sides), then the pins."""
    console.print(Text(e.reason), soft_wrap=True)
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("prompt tokens", str(e.prompt_tokens))
    table.add_row("stored", f"{e.matched_tokens} ({e.kind})")
    d = e.divergence
    if d is not None:
        left = f"pin {d.pin}" if d.pin is not None else "a stored prefix (not pinned)"
        table.add_row("leaves", f"{left} at token {d.at} of {d.of}")
        table.add_row(
            "stored text",
            Text.assemble(shown(e.before), ("⟩", "bold"), shown(e.stored_after), style="green"),
        )
        table.add_row(
            "request text",
            Text.assemble(shown(e.before), ("⟩", "bold"), shown(e.request_after), style="red"),
        )
    console.print(table)
    if e.pins:
        pins = Table(title="pins, nearest first")
        pins.add_column("pin", no_wrap=True)
        pins.add_column("tokens", justify="right")
        pins.add_column("matched", justify="right")
        pins.add_column("")
        for p in e.pins:
            state = "whole" if p.whole else f"differs from token {p.matched}"
            pins.add_row(p.name, str(p.n_tokens), str(p.matched), state)
        console.print(pins)
