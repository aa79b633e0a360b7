"""How long work tells its caller how far it got, without knowing who listens.

Library code calls ``progress(what, done, total)`` as it goes; the CLI turns the calls into a
bar on a terminal or into plain lines in a log (``dymoe/console.py``); tests and library users
pass nothing. No rendering library is imported below the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]  # (what is being done, done so far, total)


def silent(what: str, done: int, total: int) -> None:
    """The default listener: nobody."""


class Counter:
    """Counts steps of one piece of work for a listener: ``tick()`` after each step."""

    def __init__(self, progress: ProgressFn | None, what: str, total: int, done: int = 0) -> None:
        self.progress = progress or silent
        self.what = what
        self.total = total
        self.done = done
        self.progress(what, done, total)

    def tick(self, n: int = 1, what: str | None = None) -> None:
        self.done += n
        if what is not None:
            self.what = what
        self.progress(self.what, self.done, self.total)

    def relabel(self, what: str, total: int | None = None, done: int | None = None) -> None:
        self.what = what
        self.total = self.total if total is None else total
        self.done = self.done if done is None else done
        self.progress(self.what, self.done, self.total)
