"""One progress style for every long job: a live bar on a terminal, plain periodic lines in logs.

Training, caching, evaluation, context extraction and interpretation all run for minutes to hours.
On a terminal each shows a labelled rich bar with its count, rate, elapsed time and ETA, and any
status lines under it (training shows a line per SAE); when stderr is not a terminal (CI, ``nohup``,
a pipe), a live bar would print carriage-return soup or nothing, so a plain line is written at most
every ``ROUTESAE_PROGRESS_EVERY`` seconds (default 15) and once at the end. Everything goes to stderr:
stdout stays free for ``--json``.
"""

from __future__ import annotations

import os
import time
from types import TracebackType
from typing import Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

EVERY_VARIABLE = "ROUTESAE_PROGRESS_EVERY"
DEFAULT_EVERY_S = 15.0


def plain_every() -> float:
    """Seconds between plain progress lines (``ROUTESAE_PROGRESS_EVERY``; 0 writes one per update)."""
    return float(os.environ.get(EVERY_VARIABLE, DEFAULT_EVERY_S))


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """Progress of one job over ``total`` ``unit`` (tokens, latents, ...): ``with JobProgress(...) as p: p.advance(n)``.

    ``status`` is a short text after the bar ("harvesting the first shuffle group"); ``lines`` are
    shown under it, one per row (training's per-SAE loss and L0). ``enabled=False`` shows nothing
    (other ranks under ``torchrun``, ``progress=False`` in the API).
    """

    def __init__(self, label: str, total: int, unit: str = "tokens", *, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.console = console or Console(stderr=True)
        self.completed = self.initial = 0
        self.measured_rate: float | None = None
        self.status = ""
        self.lines: list[str] = []
        self.live = enabled and self.console.is_terminal
        self.started = self.last_plain = time.monotonic()
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {unit}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.task: TaskID = self.bar.add_task(label, total=total, rate="", status="")
        self.display = Live(self._renderable(), console=self.console, transient=False, auto_refresh=True)

    def __enter__(self) -> Self:
        self.started = self.last_plain = time.monotonic()
        self.initial = self.completed  # a resumed job starts part-way: its rate counts this session's work
        if self.live:
            self.display.start()
        elif self.enabled and self.status:  # what it is doing before the first update: say so at once
            self._plain()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        """Stop the bar (a last plain line saying how long it took, unless the job ``failed``)."""
        if self.live:
            self.display.update(self._renderable(), refresh=True)
            self.display.stop()
        elif self.enabled and not failed:
            self._plain(final=True)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """This session's units per second (or the last rate the caller measured and gave)."""
        if self.measured_rate is not None:
            return self.measured_rate
        return (self.completed - self.initial) / self.seconds if self.seconds > 0 else 0.0

    def rate_text(self) -> str:
        """``1,305 tokens/s``; below one item a second, the seconds per item (``8.1 s per latent``), not ``0 latents/s``."""
        if 0 < self.rate < 1:
            return f"{1 / self.rate:,.1f} s per {self.unit.removesuffix('s')}"
        return f"{self.rate:,.0f} {self.unit}/s"

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: int, *, status: str | None = None, lines: list[str] | None = None,
               rate: float | None = None) -> None:
        """Set the count (and the status, the lines under the bar, or a rate measured by the caller)."""
        self.completed = completed
        if status is not None:
            self.status = status
        if lines is not None:
            self.lines = lines
        if rate is not None:
            self.measured_rate = rate
        if not self.enabled:
            return
        self.bar.update(self.task, completed=completed, rate=self.rate_text(), status=self.status)
        if self.live:
            self.display.update(self._renderable())
        elif time.monotonic() - self.last_plain >= plain_every():
            self._plain()

    def print(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(text, highlight=False)

    def _renderable(self) -> Group:
        return Group(self.bar, *(Text(line) for line in self.lines))

    def _plain(self, final: bool = False) -> None:
        self.last_plain = time.monotonic()
        left = (self.total - self.completed) / self.rate if self.rate > 0 else None
        when = f"done in {duration(self.seconds)}" if final else f"ETA {duration(left) if left is not None else '?'}"
        parts = [f"{self.label} {self.completed:,}/{self.total:,} {self.unit}", self.rate_text(), when]
        if self.status and not final:
            parts.append(self.status)
        self.console.print(" · ".join(parts), highlight=False, soft_wrap=True)
        for line in self.lines:
            self.console.print(f"  {line}", highlight=False, soft_wrap=True)
