"""Progress when stderr is not a terminal: plain lines, quiet for short work, throttled, and with
an estimate of the time left, so a long step in a CI log is never silent."""

from __future__ import annotations

import io

from rich.console import Console

from dymoe import console as progress_console
from dymoe.console import LOG_EVERY_S, QUIET_S, Reporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reporter(monkeypatch) -> tuple[Reporter, Clock, io.StringIO]:
    clock = Clock()
    monkeypatch.setattr(progress_console.time, "monotonic", clock)
    buf = io.StringIO()
    return Reporter(Console(file=buf, width=200), terminal=False), clock, buf


def test_short_work_prints_nothing(monkeypatch):
    report, clock, buf = _reporter(monkeypatch)
    with report:
        for i in range(11):
            report("export", i, 10)
            clock.now += (QUIET_S - 1) / 10
    assert buf.getvalue() == ""


def test_long_work_prints_throttled_lines_with_time_left(monkeypatch):
    report, clock, buf = _reporter(monkeypatch)
    steps = 40
    with report:
        for i in range(steps + 1):
            report("bench: round 1/2, lru", i, steps)
            clock.now += 2.0  # 80 s in all
    lines = buf.getvalue().splitlines()
    # one line every LOG_EVERY_S at most, none in the first QUIET_S
    assert 80 / LOG_EVERY_S - 2 <= len(lines) <= 80 / LOG_EVERY_S + 1, lines
    first = lines[0]
    assert first.startswith("bench: round 1/2, lru: ") and "s left" in first
    done = int(first.split(": ")[-1].split("/")[0])
    elapsed = 2.0 * done
    left = float(first.split("about ")[1].split(" s left")[0])
    assert abs(left - elapsed / done * (steps - done)) <= 1  # the pace so far, carried forward


def test_a_new_piece_of_work_restarts_the_estimate(monkeypatch):
    report, clock, buf = _reporter(monkeypatch)
    with report:
        for i in range(5):  # a slow first piece: 20 s a step
            report("export", i, 4)
            clock.now += 20.0
        for i in range(31):  # then a fast one: 1 s a step
            report("bench", i, 30)
            clock.now += 1.0
    bench = [line for line in buf.getvalue().splitlines() if line.startswith("bench") and "left" in line]
    assert bench, buf.getvalue()
    left = float(bench[0].split("about ")[1].split(" s left")[0])
    assert left <= 30  # not inflated by the export's pace


def test_on_a_terminal_the_bar_shows_the_work_being_done(monkeypatch):
    buf = io.StringIO()
    report = Reporter(Console(file=buf, width=80, force_terminal=True), terminal=True)
    with report:
        for what in ("export", "bench", "export"):  # work that comes back after another is shown again
            report(what, 1, 2)
        visible = [t.description for t in report._bar.tasks if t.visible]
    assert visible == ["export"]
