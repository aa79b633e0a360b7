"""The README cannot drift from the code: every shell example in it runs as written, in order, in
a scratch folder laid out like the repository (its `models/` linked in), and must succeed.

A block that cannot run here says why in a marker right above it (`<!-- not run: REASON -->`: a
multi-GB checkpoint, a GPU, a server that runs until stopped, minutes of benchmarking); its
`dymoe` lines are still parsed by the real command line, so a renamed or mistyped option fails.
`make X` lines are never run (`make test` would recurse); their target must exist. The marked
blocks are few, and stay few."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from dymoe.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]+?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
MOST_NOT_RUN = 6  # GPU, big checkpoints, the server and its clients, long benchmarks


def blocks() -> list[tuple[str, str | None, str]]:
    return [(m["lang"], m["why"], m["body"]) for m in BLOCK.finditer(README)]


def commands(body: str) -> list[str]:
    """Lines of a shell block, continuations joined, comment-only lines dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def test_examples_are_found_and_labelled():
    found = blocks()
    shell = [b for b in found if b[0] == "bash"]
    assert len(shell) >= 8
    for lang, _, body in found:  # no example hides in an unlabelled block, where this test would miss it
        if lang != "bash":
            assert not any(re.match(r"(dymoe|make|curl) ", line) for line in commands(body)), body
    not_run = [why for _, why, _ in found if why]
    assert 0 < len(not_run) <= MOST_NOT_RUN, not_run
    assert all(len(why.split()) >= 3 for why in not_run)  # a reason, not a bare marker


def test_the_two_commands_are_the_makefile_and_ci_entry_points():
    assert "| main job (demo on the embedded default model) | `make demo` |" in README
    assert "| tests | `make test` |" in README
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)  # CI runs the README's command


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def _parse(args: list[str]) -> None:
    """Parse ``dymoe ARGS`` with the real command line, running nothing: unknown options, missing
    arguments and values of the wrong type fail here."""
    cli = get_command(app)
    name, rest = args[0], list(args[1:])
    with cli.make_context("dymoe", [], resilient_parsing=False) as ctx:
        cmd = cli.get_command(ctx, name)
        assert cmd is not None, f"no command {name!r}"
        cmd.make_context(name, rest, parent=ctx).close()


def test_unrun_examples_parse():
    checked = 0
    for lang, why, body in blocks():
        if lang != "bash" or not why:
            continue
        for line in commands(body):
            w = words(line)
            if "dymoe" in w:
                args = w[w.index("dymoe") + 1:]  # after any VAR=value prefix
                try:
                    _parse(args)
                except typer.TyperException as e:  # typer's own click: unknown option, bad value, missing argument
                    pytest.fail(f"README example does not parse: {line}\n{e}")
                checked += 1
            elif w[0] == "make":
                assert w[1] in _make_targets(), line
            else:
                assert w[0] in ("curl",), f"an unrun example needs a check of its own: {line}"
    assert checked >= 10


def test_python_example_compiles():
    for lang, _, body in blocks():
        if lang == "python":
            compile(body, "README.md", "exec")


@pytest.mark.slow
def test_runnable_examples_run(tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for lang, why, body in blocks():
        if lang != "bash" or why:
            continue
        for line in commands(body):
            if words(line)[0] == "make":
                assert words(line)[1] in _make_targets(), line
                continue
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, f"README example failed: {line}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, line
            ran += 1
    assert ran >= 15
    # what the examples say they write is there
    for path in ("bundles/demo/manifest.json", "run.json", "m.json", "bench.json", "plots/ttft.png",
                 "results/calibration/report.md", "bundles/demo-gptq/manifest.json"):
        assert (tmp_path / path).is_file(), path
