"""An export killed midway leaves no bundle, and rerunning the same command completes one
that is byte-identical (per file) to an uninterrupted export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dymoe.bundle.journal import read_journal
from dymoe.bundle.manifest import read_manifest, verify_file
from dymoe.toolchain.export import JOURNAL
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

ARGS = ["--precisions", "fp32,int8,int4,int2"]


def export_cmd(src, out):
    return [sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out), *ARGS]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "src"
    write_synthetic_checkpoint(folder, hidden=128, intermediate=256, experts=16, layers=4, heads=4, kv_heads=2,
                               vocab=256, max_position_embeddings=64)
    return folder


def _done_entries(out) -> int:
    return len(read_journal(out / JOURNAL)[1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_export_resumes_to_identical_bundle(src, tmp_path, sig):
    out = tmp_path / "bundle"
    proc = subprocess.Popen(export_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _done_entries(out) < 30:
        assert proc.poll() is None, "export finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGINT:
        assert "rerun the same command to resume" in stderr
    partial = _done_entries(out)
    assert 30 <= partial < 4 * 16 * 4  # stopped midway

    # the unfinished folder is refused by the runtime with a pointer to the fix
    run = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", str(out), "--prompt", "w1"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "rerun the same dymoe export command" in run.stderr

    (out / "experts" / ".expert_999.fp32.onnx.abcd.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    resumed = subprocess.run(export_cmd(src, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / JOURNAL).exists()
    m = read_manifest(out)
    for rel in m.files:
        verify_file(out, m, rel)
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []

    clean = tmp_path / "clean"
    assert subprocess.run(export_cmd(src, clean), capture_output=True).returncode == 0
    assert {k: v.sha256 for k, v in read_manifest(clean).files.items()} == {k: v.sha256 for k, v in m.files.items()}


def test_resume_with_other_options_is_refused(src, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen(export_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while _done_entries(out) < 5:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    other = subprocess.run([sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out),
                            "--precisions", "fp16"], capture_output=True, text=True)
    assert other.returncode == 1
    assert "different checkpoint or options" in other.stderr and "--force" in other.stderr


def test_parallel_workers_write_the_same_bundle(src, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert subprocess.run(export_cmd(src, one), capture_output=True).returncode == 0
    proc = subprocess.run(export_cmd(src, two) + ["--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {k: v.sha256 for k, v in read_manifest(one).files.items()} == \
        {k: v.sha256 for k, v in read_manifest(two).files.items()}


def test_more_workers_than_cores_same_bundle_and_every_step_counted(src, tmp_path):
    """The default ladder (fp16 too) with one worker in the process and with three processes (the
    embedding and LM head share one job; results are journaled as they finish): the same bytes,
    and progress reaches the total exactly."""
    from dymoe.toolchain.export import ExportOptions, export

    seen = {}
    manifests = {}
    for workers in (1, 3):
        calls: list[tuple[int, int]] = []
        options = ExportOptions(workers=workers, progress=lambda what, done, total, calls=calls:
                                calls.append((done, total)))
        manifests[workers] = export(str(src), tmp_path / f"w{workers}", options)
        seen[workers] = calls
    assert {k: v.sha256 for k, v in manifests[1].files.items()} == {k: v.sha256 for k, v in manifests[3].files.items()}
    for calls in seen.values():
        total = calls[0][1]
        assert calls[-1] == (total, total) and total == 2 + 4 + 4 + 4 * 16  # embed, head, layers, routers, experts
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_journal_ignores_a_torn_last_line(tmp_path):
    from dymoe.bundle.journal import Journal

    path = tmp_path / JOURNAL
    j = Journal(path, "abc", {"a.onnx": {"bytes": 1, "sha256": "x"}})
    j.record({"b.onnx": {"bytes": 2, "sha256": "y"}})
    j.close()
    with open(path, "a") as f:
        f.write('{"path": "c.onnx", "byt')  # killed mid-append
    fingerprint, done = read_journal(path)
    assert fingerprint == "abc"
    assert done == {"a.onnx": {"bytes": 1, "sha256": "x"}, "b.onnx": {"bytes": 2, "sha256": "y"}}
    assert read_journal(tmp_path / "missing") == (None, {})
