"""What the CLI shows while work runs: one progress line per piece of work, a rich bar on a
terminal, plain timestamped lines in a log (every few seconds and at the end), so a long step is
never silent. Library code reports through ``dymoe.bundle.progress``; only this module renders."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

QUIET_S = 5.0  # plain-line progress: work shorter than this prints nothing (quick commands stay quiet)
LOG_EVERY_S = 10.0  # then at most one line per piece of work this often, and one when it ends


class Reporter:
    """A ``ProgressFn`` for the duration of a ``with`` block."""

    def __init__(self, console: Console, terminal: bool | None = None) -> None:
        self.console = console
        self.terminal = console.is_terminal if terminal is None else terminal
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._shown: int | None = None  # the task on screen
        self._first: float | None = None
        self._last_line = 0.0
        self._last_what = ""
        self._piece = 0.0  # when the piece of work being reported started
        self._total = self._done = -1

    def __enter__(self) -> Reporter:
        if self.terminal:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def __call__(self, what: str, done: int, total: int) -> None:
        if self._bar is not None:
            task = self._tasks.get(what)
            if task is None:
                task = self._tasks[what] = self._bar.add_task(what, total=total)
            if task != self._shown:  # one line at a time: the newest piece of work, shown again if it comes back
                if self._shown is not None:
                    self._bar.update(self._shown, visible=False)
                self._shown = task
            self._bar.update(task, completed=done, total=total, visible=True)
            return
        # plain lines: one stream for all the work of a command, throttled as a whole (labels change
        # as work moves on, e.g. "bench: round 2/3, lru"), quiet for short commands
        now = time.monotonic()
        self._first = self._first if self._first is not None else now
        if total != self._total or done < self._done:  # a new piece of work: its own clock for the estimate
            self._piece = now
        self._total, self._done = total, done
        due = now - self._first >= QUIET_S and now - self._last_line >= LOG_EVERY_S
        if due or (done >= total and self._last_line > 0 and what != self._last_what):
            self._last_line, self._last_what = now, what
            self.console.print(f"{what}: {done}/{total} ({_times(now - self._piece, done, total)})", highlight=False)


def _times(elapsed: float, done: int, total: int) -> str:
    """Elapsed seconds, and a naive estimate of what is left (steps taken so far at the same pace)."""
    if 0 < done < total:
        return f"{elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s left"
    return f"{elapsed:.0f} s"


def reporter(console: Console) -> Reporter:
    return Reporter(console, console.is_terminal and sys.stderr.isatty())
