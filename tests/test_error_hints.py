"""Every error a user can fix says what to do next: the CLI prints it as a second line
(`  hint: ...`), so an error raised without a hint would print one line and leave them stuck."""

from __future__ import annotations

import ast
from pathlib import Path

import dymoe.bundle.errors as errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bundle", "toolchain", "runtime", "calibration", "targets", "dymoe")
ERRORS = {name for name in dir(errors) if name.endswith("Error")}


def hintless() -> list[str]:
    found = []
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS
                        and len(node.args) < 2 and not any(k.arg == "hint" for k in node.keywords)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_user_error_has_a_hint():
    assert ERRORS >= {"DymoeError", "InputError"}  # the scan looks for the right names
    assert hintless() == []
