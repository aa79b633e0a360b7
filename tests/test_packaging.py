"""The built wheel installs everything under one `dymoe` package and runs without the repo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_imports_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(ROOT)], check=True, capture_output=True, text=True)
    # the project's packaging is clean: setuptools has nothing to warn about (license form, data folders
    # it would have to guess are packages); pip relays any backend warning as BuildBackendWarning
    assert "Warning" not in built.stdout + built.stderr, built.stderr[-3000:]
    (wheel,) = wheels.glob("dymoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("dymoe-")}
    assert tops == {"dymoe"}  # nothing generic like `runtime` in site-packages
    folders = {"bundle": "bundle", "toolchain": "toolchain", "runtime": "runtime", "calibration": "calibration",
               "targets": "targets", "models": "models", "dymoe": ""}
    for folder, inside in folders.items():  # every source module of every package folder is shipped
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"dymoe/{inside + '/' if inside else ''}{rel}" in names, rel
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import dymoe, dymoe.toolchain.export, dymoe.toolchain.archs.deepseek_v3, dymoe.runtime.model_session; "
            "print(dymoe.__file__); from dymoe.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(target))
    for command in ("export", "run", "info", "demo"):
        assert command in proc.stdout


def test_runtime_and_toolchain_do_not_import_torch():
    code = ("import sys, dymoe.cli, dymoe.toolchain.export, dymoe.runtime.model_session; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
