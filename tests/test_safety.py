"""dymoe never reads, writes or deletes anything that is not its own, and every bad input gets
a clean error (two lines, exit status 1, no traceback). Each case here was reproduced against an
earlier release, where it read, overwrote or deleted a foreign file, or printed a traceback."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dymoe.bundle import fsutil
from dymoe.bundle.errors import BundleError
from dymoe.bundle.manifest import read_manifest, verify_file
from dymoe.bundle.naming import LOCK_NAME
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

PRECISIONS = "fp32,int4"


def dymoe(*args, umask: int | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dymoe.cli", *[a if isinstance(a, bytes) else str(a) for a in args]],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)), **kw)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The README's promise: ``error: ...`` and ``  hint: ...``, status 1, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Warning" not in text, text
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error:"), proc.stderr
    assert lines[-1].lstrip().startswith("hint:") and len(lines) == 2, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (links not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "src"
    write_synthetic_checkpoint(folder, hidden=64, intermediate=64, experts=4, layers=2, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=32)
    return folder


@pytest.fixture(scope="module")
def made(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "b"
    proc = dymoe("export", src, "--out", out, "--precisions", PRECISIONS)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture()
def bundle(made, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(made, copy)
    return copy


@pytest.fixture()
def victim(tmp_path) -> Path:
    """Someone else's files, beside the bundle."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "victim.txt").write_text("precious")
    (folder / "layer_000.safetensors").write_bytes(b"not dymoe's")
    (folder / "model.onnx").write_bytes(b"not dymoe's either")
    return folder


def _edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def _point_variant_at(bundle: Path, target: str, data: bytes) -> None:
    """Make expert 0 of layer 0 at int4 a file named ``target``, listed with its true sha256."""
    def edit(m):
        old = m["experts"][0]["variants"]["int4"]["path"]
        m["experts"][0]["variants"]["int4"]["path"] = target
        m["files"][target] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        del m["files"][old]
    _edit_manifest(bundle, edit)


# ------------------------------------------------------------------ paths stay inside the bundle


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, kind):
    outside = tmp_path / "x.onnx"
    data = (bundle / read_manifest(bundle).expert(0, 0).variants["int4"].path).read_bytes()
    outside.write_bytes(data)  # a valid expert graph with the checksum the manifest claims
    target = str(outside) if kind == "absolute" else "../x.onnx"
    _point_variant_at(bundle, target, data)
    for cmd in (["info", bundle], ["run", bundle, "-p", "w1", "--precision", "int4"]):
        err = assert_clean_error(dymoe(*cmd), repr(target))
        assert "absolute" in err or "'..'" in err


@pytest.mark.parametrize("where", ["file", "folder"])
def test_symlinks_that_leave_the_bundle_are_not_followed(bundle, tmp_path, where):
    rel = read_manifest(bundle).expert(0, 0).variants["int4"].path
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "file":
        shutil.move(bundle / rel, outside / "e.onnx")
        os.symlink(outside / "e.onnx", bundle / rel)
    else:
        shutil.move(bundle / "experts", outside / "experts")
        os.symlink(outside / "experts", bundle / "experts")
    assert_clean_error(dymoe("run", bundle, "-p", "w1", "--precision", "int4"), "leads outside the bundle")
    assert_clean_error(dymoe("run", bundle, "-p", "w1", "--policy", "static-int4"), "leads outside the bundle")


def test_symlinks_inside_the_bundle_are_fine(bundle):
    rel = read_manifest(bundle).expert(0, 0).variants["int4"].path
    shutil.move(bundle / rel, bundle / "moved.onnx")
    os.symlink(bundle / "moved.onnx", bundle / rel)
    proc = dymoe("run", bundle, "-p", "w1", "--precision", "int4", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr


def test_calibrate_never_deletes_through_a_linked_inputs_folder(bundle, victim, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    args = ["--data", text, "--samples", "2", "--seq-len", "16", "--no-sensitivity", "--no-report"]
    assert dymoe("calibrate", bundle, *args, "--collect-inputs").returncode == 0
    before = tree(victim)
    shutil.rmtree(bundle / "calibration-inputs")
    os.symlink(victim, bundle / "calibration-inputs")
    assert_clean_error(dymoe("calibrate", bundle, *args), "leads outside the bundle")
    assert_clean_error(dymoe("calibrate", bundle, *args, "--collect-inputs"), "leads outside the bundle")
    assert tree(victim) == before


def test_calibrate_never_deletes_a_dotdot_entry(bundle, victim, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    rel = f"calibration-inputs/../../{victim.name}/victim.txt"
    data = (victim / "victim.txt").read_bytes()
    _edit_manifest(bundle, lambda m: m["files"].update({rel: {"bytes": len(data),
                                                               "sha256": hashlib.sha256(data).hexdigest()}}))
    assert_clean_error(dymoe("calibrate", bundle, "--data", text, "--samples", "2", "--seq-len", "16",
                             "--no-sensitivity", "--no-report"), "'..'")
    assert (victim / "victim.txt").read_text() == "precious"


def test_requantize_never_deletes_through_a_linked_experts_folder(bundle, victim):
    shutil.copytree(bundle / "experts", victim / "experts")
    shutil.rmtree(bundle / "experts")
    os.symlink(victim / "experts", bundle / "experts")
    before = tree(victim)
    assert_clean_error(dymoe("requantize", bundle, "--quantizer", "rtn"), "leads outside the bundle")
    assert tree(victim) == before


def test_requantize_deletes_only_the_files_it_replaced(bundle):
    stray = bundle / "experts" / "layer_000" / "mine.onnx"
    stray.write_bytes(b"a user's own file")
    old = {rel for rel in read_manifest(bundle).files if ".int4." in rel}
    assert dymoe("requantize", bundle, "--quantizer", "rtn").returncode == 0
    m = read_manifest(bundle)
    assert stray.read_bytes() == b"a user's own file"
    assert not any((bundle / rel).exists() for rel in old - set(m.files))
    for rel in m.files:
        verify_file(bundle, m, rel)


# ------------------------------------------------------------------ export into existing folders


def test_force_never_deletes_a_foreign_folder(src, tmp_path):
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "src" / "index.js").write_text("console.log(1)")
    (app / "README").write_text("my app")
    (app / "manifest.json").write_text(json.dumps({"name": "my web app", "version": "1.0"}))
    before = tree(app)
    for extra in ([], ["--force"]):
        err = assert_clean_error(dymoe("export", src, "--out", app, *extra), "not a dymoe bundle")
        assert "--force" not in err
    assert tree(app) == before and sorted(p.name for p in app.iterdir()) == ["README", "manifest.json", "src"]


def test_force_replaces_a_bundle_but_keeps_files_it_did_not_write(made, src, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(made, out)
    (out / "notes.txt").write_text("mine")
    assert_clean_error(dymoe("export", src, "--out", out, "--precisions", "fp16"), "already holds", "--force")
    proc = dymoe("export", src, "--out", out, "--precisions", "fp16", "--force")
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(out)
    assert m.quantization.precisions == ["fp16"]
    assert (out / "notes.txt").read_text() == "mine"
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(m.files) | {"manifest.json", LOCK_NAME, "notes.txt"}


def test_export_into_an_empty_folder_is_fine(src, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert dymoe("export", src, "--out", out, "--precisions", "int4").returncode == 0


# ------------------------------------------------------------------ file modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_are_written_with_the_umask(src, tmp_path, umask):
    out = tmp_path / "b"
    assert dymoe("export", src, "--out", out, "--precisions", "int4", umask=umask).returncode == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    proc = dymoe("calibrate", out, "--data", text, "--samples", "2", "--seq-len", "16", "--no-sensitivity",
                 umask=umask)
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name == "calibration.json" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    for p in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask, p


# ------------------------------------------------------------------ one writer per bundle


def _hold_lock(folder: Path, pid_text: str = "4242 dymoe export"):
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, pid_text.encode())
    return fd


def test_a_second_writer_is_told_who_holds_the_bundle(bundle, src, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    fd = _hold_lock(bundle)
    try:
        for cmd in (["export", src, "--out", bundle, "--force"], ["requantize", bundle, "--quantizer", "rtn"],
                    ["calibrate", bundle, "--data", text, "--no-report"]):
            assert_clean_error(dymoe(*cmd), "in use by PID 4242")
        # readers are never blocked
        assert dymoe("run", bundle, "-p", "w1", "--max-new-tokens", "2").returncode == 0
        assert dymoe("info", bundle).returncode == 0
    finally:
        os.close(fd)
    assert dymoe("requantize", bundle, "--quantizer", "rtn").returncode == 0  # free again


def test_concurrent_exports_leave_a_consistent_bundle(src, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"b{attempt}"
        cmds = [[sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out), "--precisions", p]
                for p in ("fp32,int8", "fp16,int4")]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert any(rc == 0 for rc, _ in results), results
        for rc, err in results:
            assert rc == 0 or (rc == 1 and "Traceback" not in err and
                               ("in use by" in err or "already holds a complete bundle" in err)), err
        m = read_manifest(out)
        for rel in m.files:
            verify_file(out, m, rel)


# ------------------------------------------------------------------ worker processes


def test_workers_die_with_a_killed_export(tmp_path):
    psutil = pytest.importorskip("psutil")
    src = tmp_path / "src"
    write_synthetic_checkpoint(src, hidden=128, intermediate=256, experts=16, layers=4, heads=4, kv_heads=2,
                               vocab=256, max_position_embeddings=64)
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out),
                             "--precisions", "fp32,fp16,int8,int4,int2", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while len(parent.children()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "export ended before it had two workers"
        time.sleep(0.05)
    children = parent.children()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"workers outlived their parent: {alive}"


# ------------------------------------------------------------------ impossible configs


@pytest.mark.parametrize("edit, needle", [
    ({"num_experts_per_tok": 32}, "num_experts_per_tok is 32, more than the 4 experts"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0"),
    ({"num_local_experts": 0}, "num_local_experts is 0"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"hidden_size": 62}, "not a multiple of num_attention_heads"),
    ({"hidden_size": 60}, "head_dim is 15; the rotary embedding needs an even head size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads is 3, which does not divide"),
    ({"num_hidden_layers": "two"}, "num_hidden_layers is 'two', which is not an integer"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
])
def test_impossible_configs_are_refused(src, tmp_path, edit, needle):
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(edit)
    (copy / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(dymoe("export", copy, "--out", tmp_path / "b"), "config.json", needle)
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ clean errors for bad input


def test_prompt_with_undecodable_bytes(made):
    assert_clean_error(dymoe("run", made, "--prompt", b"w1 \xff\xfe w2"), "not valid UTF-8")


def test_negative_seed(made):
    assert_clean_error(dymoe("run", made, "-p", "w1", "--temperature", "0.7", "--seed", "-1"), "--seed -1")


@pytest.mark.parametrize("speed, needle", [("0", "read_mb_per_s is 0"), ("-5", "read_mb_per_s is -5")])
def test_storage_profile_with_impossible_speed(made, tmp_path, speed, needle):
    profile = tmp_path / "p.toml"
    profile.write_text(f'name = "bad"\nread_mb_per_s = {speed}\nlatency_ms = 0.1\n')
    assert_clean_error(dymoe("run", made, "-p", "w1", "--policy", "lru", "--storage-profile", profile), needle)


def test_output_paths_are_checked_before_any_work(made, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file.png"
    a_file.write_text("x")
    t0 = time.monotonic()
    assert_clean_error(dymoe("run", made, "-p", "w1", "--metrics-json", folder), "--metrics-json", "is a folder")
    assert_clean_error(dymoe("bench", made, "--plot", a_file, "--no-accuracy"), "--plot", "is a file")
    assert_clean_error(dymoe("bench", made, "--json", folder, "--no-accuracy"), "--json", "is a folder")
    assert_clean_error(dymoe("eval", made, "--data", folder), "--data", "is a folder")
    assert_clean_error(dymoe("eval", made, "--data", a_file, "--json", folder), "--json", "is a folder")
    assert time.monotonic() - t0 < 60  # no bench ran before the error


def test_on_load_error_fallback_prints_plain_warnings(bundle):
    m = read_manifest(bundle)
    for e in range(m.model.num_experts):
        path = bundle / m.expert(0, e).variants["int4"].path
        data = bytearray(path.read_bytes())
        data[-20] ^= 0x55
        path.write_bytes(bytes(data))
    proc = dymoe("run", bundle, "-p", "w1 w2", "--policy", "static-int4", "--on-load-error", "fallback",
                 "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and all("failed to load" in w for w in warnings)
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


# ------------------------------------------------------------------ full or read-only disks
# In process (Typer's runner), with the file system's answers replaced: a real full or read-only
# disk cannot be made here without privileges.


def _cli(*args):
    from typer.testing import CliRunner

    from dymoe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_clean(result, *needles):
    assert result.exit_code == 1, (result.output, result.exception)
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert "Traceback" not in text and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def _one_mib_free(path):
    return SimpleNamespace(total=10**9, used=10**9 - 2**20, free=2**20)


def test_too_little_free_space_is_refused_before_export(src, tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil.shutil, "disk_usage", _one_mib_free)
    out = tmp_path / "b"
    _assert_clean(_cli("export", src, "--out", out), "needs about", "only 1.0 MiB is free")
    assert not (out / "backbone").exists()


def test_disk_full_during_export_is_clean_and_resumable(src, tmp_path, monkeypatch):
    out = tmp_path / "b"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    _assert_clean(_cli("export", src, "--out", out, "--precisions", PRECISIONS), "disk filled up", "rerun")
    monkeypatch.setattr(fsutil.os, "fsync", real_fsync)
    assert not [p for p in out.rglob("*.tmp")]
    assert _cli("export", src, "--out", out, "--precisions", PRECISIONS).exit_code == 0
    m = read_manifest(out)
    for rel in m.files:
        verify_file(out, m, rel)


def test_collect_inputs_checks_the_disk_first(bundle, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    before = tree(bundle)
    monkeypatch.setattr(fsutil.shutil, "disk_usage", _one_mib_free)
    _assert_clean(_cli("calibrate", bundle, "--data", text, "--collect-inputs", "--no-report"), "--collect-inputs",
                  "needs about")
    assert tree(bundle) == before


def test_read_only_bundle_fails_before_calibrating(bundle, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(2000)))
    real_open = os.open

    def read_only(path, flags, *args, **kw):
        if str(path).startswith(str(bundle)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    from dymoe.calibration import run as cal_run

    measured = []
    monkeypatch.setattr(cal_run, "measure", lambda *a, **k: measured.append(1))
    monkeypatch.setattr(os, "open", read_only)
    _assert_clean(_cli("calibrate", bundle, "--data", text, "--no-report"), "read-only")
    assert measured == []


# ------------------------------------------------------------------ property: random names and manifests


def test_random_names_resolve_inside_or_fail_cleanly(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from dymoe.bundle.paths import resolve

    root = tmp_path / "bundle"
    (root / "experts").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    os.symlink(root / "experts", root / "inner")
    real_root = Path(os.path.realpath(root))
    parts = st.sampled_from(["experts", "link", "inner", "..", ".", "", "a.onnx", "x", "~", "/", "\\", "\x00",
                             str(tmp_path), "C:", "é"])

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(st.one_of(st.lists(parts, min_size=1, max_size=6).map("/".join), st.text(max_size=40)))
    def check(rel):
        try:
            path = resolve(root, rel)
        except BundleError as e:
            assert e.message and e.hint
            return
        assert path == real_root or real_root in path.parents, (rel, path)

    assert hypothesis
    check()


def test_random_manifest_edits_never_escape(made, tmp_path):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dymoe.bundle.manifest import check_confined

    base = json.loads((made / "manifest.json").read_text())
    rels = sorted(base["files"])
    evil = st.sampled_from(["../x", "/etc/passwd", "a/../../b", "", ".", "ok.onnx", "experts//x", "\\\\srv\\x",
                            "experts/layer_000/expert_000.int4.onnx", "calibration-inputs/../../v"])
    value = st.one_of(evil, st.integers(-5, 100), st.none(), st.booleans(), st.lists(evil, max_size=3),
                      st.dictionaries(evil, st.integers(), max_size=2))

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 9), st.integers(0, len(rels) - 1), value, evil)
    def check(where, i, v, name):
        data = json.loads(json.dumps(base))
        if where == 0:
            data["files"][name] = data["files"].pop(rels[i])
        elif where == 1:
            data["experts"][i % len(data["experts"])]["variants"]["int4"]["path"] = v
        elif where == 2:
            data["backbone"]["layers"][0] = v
        elif where == 3:
            data["tokenizer"] = [v]
        elif where == 4:
            data["calibration"] = v
        elif where == 5:
            data["files"][rels[i]]["sha256"] = v
        elif where == 6:
            data["model"]["top_k"] = v
        elif where == 7:
            data["backbone"]["embed"] = name
        elif where == 8:
            data["files"][rels[i]]["bytes"] = v
        else:
            data["quantization"]["precisions"] = [v]
        folder = tmp_path / "m"
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps(data))
        try:
            m = read_manifest(folder)
        except BundleError as e:
            assert e.message and e.hint
            return
        check_confined(folder, m)  # whatever was accepted names only files inside
        for rel in m.files:
            assert not rel.startswith("/") and ".." not in rel.split("/")

    check()
