"""How the packages stack, checked from the source (every import, also those inside functions):
the bundle contract at the bottom imports nothing of dymoe's; toolchain, runtime and targets
stand on it alone; calibration may use the runtime; only ``dymoe/`` (CLI, demo, pipelines)
uses everything. No module imports itself back through others, rich lives only in the CLI
layer and matplotlib only where a plot is drawn."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"bundle": "dymoe.bundle", "toolchain": "dymoe.toolchain", "runtime": "dymoe.runtime",
           "calibration": "dymoe.calibration", "targets": "dymoe.targets", "dymoe": "dymoe"}
# what each folder may import besides itself
ALLOWED = {
    "bundle": set(),
    "targets": {"bundle"},
    "toolchain": {"bundle"},
    "runtime": {"bundle", "targets"},
    "calibration": {"bundle", "runtime"},
    "dymoe": {"bundle", "toolchain", "runtime", "calibration", "targets", "models"},
}
PLOTTING = {"runtime/plotting.py", "runtime/bench_plots.py", "calibration/report.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[str]:
    """Every module ``path`` imports, absolute, including relative and function-level imports."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _folder(module: str) -> str | None:
    if module == "dymoe" or not module.startswith("dymoe."):
        return "dymoe" if module == "dymoe" else None
    second = module.split(".")[1]
    return second if second in FOLDERS or second == "models" else "dymoe"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_respect_the_layers(name):
    own = _folder(name)
    for target in _imports(name, MODULES[name]):
        folder = _folder(target)
        if folder is None or folder == own or target == "dymoe.bundle.version":
            continue
        assert folder in ALLOWED[own], f"{name} imports {target}: {own}/ may use only {sorted(ALLOWED[own])}"


def test_no_import_cycles():
    graph = collections.defaultdict(set)
    for name, path in MODULES.items():
        graph[name] = {t for t in _imports(name, path) if t in MODULES and t != name}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_rich_only_in_the_cli_and_matplotlib_only_where_plots_are_drawn():
    for name, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        imports = _imports(name, path)
        if not rel.startswith("dymoe/"):
            assert not [i for i in imports if i == "rich" or i.startswith("rich.")], f"{rel} imports rich"
        if rel not in PLOTTING:
            assert not [i for i in imports if i.startswith("matplotlib")], f"{rel} imports matplotlib"


def test_the_check_itself_sees_a_violation(tmp_path):
    """Guard against a checker that passes everything: a planted upward import is reported."""
    planted = tmp_path / "x.py"
    planted.write_text("from dymoe.runtime.model import MoEModel\nfrom ..calibration import run\n")
    found = _imports("dymoe.toolchain.x", planted)
    assert "dymoe.runtime.model" in found and "dymoe.calibration.run" in found
    assert {_folder(f) for f in found} == {"runtime", "calibration"}
