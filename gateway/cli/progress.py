"""Progress of long CLI work (send, download, bulk download, verifications).

One small interface for every long operation of the ``yigong`` command line::

    with Reporter.for_args(args) as progress:
        task = progress.task("download knee.raw", total=size)
        task.advance(len(chunk))
        task.done("verified")

- on a terminal (stderr is a TTY): a ``rich`` progress bar on stderr;
- otherwise: plain lines on stderr, one when another 10 % is done or every few
  seconds, and one when the task ends;
- ``--quiet``: nothing.

stdout stays reserved for results, so ``--json`` output remains parseable.
Totals may be unknown (0): the bar then shows bytes only.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import TracebackType
from typing import IO, Any

PLAIN_INTERVAL_SECONDS = 5.0
PLAIN_STEP_PERCENT = 10


def add_progress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (bytes below 1 KiB stay exact)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


class Task:
    """One unit of work with a known (or unknown: 0) total."""

    def __init__(self, reporter: Reporter, description: str, total: int, unit: str) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.completed = 0
        self.closed = False
        self._rich_id: Any = None
        self._last_step = -1
        self._last_line = time.monotonic()
        self._started = time.monotonic()

    def advance(self, n: int) -> None:
        self.update(self.completed + n)

    def update(self, completed: int, total: int | None = None) -> None:
        """Set the absolute amount done (and optionally a newly learnt total)."""
        if total is not None:
            self.total = total
        self.completed = completed
        self.reporter._changed(self)

    def done(self, note: str = "") -> None:
        """The task ended (successfully or not); ``note`` is shown with the last line."""
        if not self.closed:
            self.closed = True
            self.reporter._finished(self, note)

    def amount(self) -> str:
        if self.unit == "bytes":
            done = human_bytes(self.completed)
            return f"{done} of {human_bytes(self.total)}" if self.total else done
        return (
            f"{self.completed} of {self.total} {self.unit}"
            if self.total
            else (f"{self.completed} {self.unit}")
        )

    def percent(self) -> int:
        return min(100, self.completed * 100 // self.total) if self.total else 0


class Reporter:
    """Progress output of one command (see the module docstring)."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        stream: IO[str] | None = None,
        terminal: bool | None = None,
        interval: float = PLAIN_INTERVAL_SECONDS,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            terminal = bool(isatty and isatty())
        self.terminal = terminal and not quiet
        self.interval = interval
        self._rich: Any = None

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Reporter:
        return cls(quiet=bool(getattr(args, "quiet", False)))

    # -- context -------------------------------------------------------------------
    def __enter__(self) -> Reporter:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.text import Text

            class AmountColumn(DownloadColumn):
                """Bytes as sizes; other units (entries, files) as plain counts."""

                def render(self, task: Any) -> Any:
                    unit = task.fields.get("unit", "bytes")
                    if unit == "bytes":
                        return super().render(task)
                    total = f"/{int(task.total)}" if task.total else ""
                    return Text(f"{int(task.completed)}{total} {unit}", style="progress.download")

            console = Console(file=self.stream, force_terminal=True)
            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                AmountColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._rich.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # -- tasks ---------------------------------------------------------------------
    def task(self, description: str, total: int = 0, unit: str = "bytes") -> Task:
        t = Task(self, description, total, unit)
        if self._rich is not None:
            t._rich_id = self._rich.add_task(description, total=total or None, unit=unit)
        return t

    def note(self, text: str) -> None:
        """A line of progress-related information (suppressed by --quiet)."""
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _changed(self, t: Task) -> None:
        if self.quiet or t.closed:
            return
        if self._rich is not None:
            self._rich.update(t._rich_id, completed=t.completed, total=t.total or None)
            return
        now = time.monotonic()
        step = t.percent() // PLAIN_STEP_PERCENT if t.total else -1
        if (t.total and step > t._last_step and t.completed < t.total) or (
            now - t._last_line >= self.interval
        ):
            t._last_step, t._last_line = max(step, t._last_step), now
            pct = f" {t.percent()}%" if t.total else ""
            print(f"{t.description}:{pct} ({t.amount()})", file=self.stream, flush=True)

    def _finished(self, t: Task, note: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.update(t._rich_id, completed=t.completed, total=t.total or t.completed)
            if note:
                self._rich.update(t._rich_id, description=f"{t.description} ({note})")
            return
        seconds = time.monotonic() - t._started
        tail = f", {note}" if note else ""
        pct = f" {t.percent()}%" if t.total else ""
        print(
            f"{t.description}:{pct} ({t.amount()}) in {seconds:.1f} s{tail}",
            file=self.stream,
            flush=True,
        )
