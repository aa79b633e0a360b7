"""What a newcomer meets first: bare `dymoe`, --version and every --help, read at 80 columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dymoe.help import reflow

COMMANDS = ("export", "requantize", "upgrade", "info", "run", "serve", "bench", "eval", "check", "build-engines",
            "demo", "calibrate")


def dymoe(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    # the installed script, as a user types it (usage lines name the program as it was started)
    return subprocess.run([str(Path(sys.executable).parent / "dymoe"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_bare_dymoe_shows_the_commands_and_succeeds():
    proc = dymoe()
    assert proc.returncode == 0, proc.stderr
    assert "Usage: dymoe" in proc.stdout and "dymoe demo" in proc.stdout
    for name in COMMANDS:
        assert re.search(rf"^\W*{re.escape(name)}\s", proc.stdout, re.M), name


def test_version():
    from dymoe import __version__

    proc = dymoe("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dymoe {__version__}"


def test_each_command_is_one_row_of_the_command_list():
    # a short help wrapped in the source used to print as broken lines in this list
    proc = dymoe(columns=120)
    panel = proc.stdout.split("Commands")[1]
    rows = [line for line in panel.splitlines() if re.match(r"^\W+[a-z]", line)]
    assert len(rows) == len(COMMANDS), rows


@pytest.mark.parametrize("name", COMMANDS)
def test_help_reads_at_80_columns(name):
    proc = dymoe(name, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert max(map(len, text.splitlines())) <= 80
    assert "%%" not in text and "{" + name not in text  # no printf escapes, no {argument} placeholders
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert not re.search(r"[{}]|\[\[", usage), usage  # arguments as BUNDLE, [PATH]...
    assert name == "demo" or re.search(r" (BUNDLE|MODEL)\b", usage), usage
    # example lines are kept whole: each one printed on one line, as written in the docstring
    for line in _examples(name):
        assert line in text, line


def _examples(name: str) -> list[str]:
    from typer.main import get_command

    from dymoe.cli import app

    cmd = get_command(app).commands[name]
    return [line.strip() for line in (cmd.help or "").splitlines() if line.startswith("  ")]


def test_reflow_joins_prose_and_keeps_examples():
    doc = """First line
    of prose.

    Examples:
      dymoe run B --prompt x
      dymoe run B \\\\
          --policy lru
    """
    want = "First line of prose.\n\nExamples:\n  dymoe run B --prompt x\n  dymoe run B \\\\\n      --policy lru"
    assert reflow(doc) == want
