"""``dymoe requantize`` and ``dymoe export --quantizer gptq`` on a small synthetic bundle.

The bundle comes from a numpy-written Mixtral-layout checkpoint (3 layers x 8 experts, hidden 64),
exported with round-to-nearest, then calibrated on random text with the experts' inputs collected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dymoe.bundle.calibration import read_calibration
from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.manifest import read_manifest, verify_file
from dymoe.calibration.options import CalibrationOptions
from dymoe.calibration.run import commit, measure
from dymoe.pipelines import GptqOptions
from dymoe.pipelines import export as export_pipeline
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.model import MoEModel
from dymoe.toolchain import requantize as requantize_mod
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.quantizers import QuantizerOptions
from dymoe.toolchain.requantize import JOURNAL, RequantizeOptions, requantize
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

PRECISIONS = ("fp32", "int8", "int4", "int2")
INTEGER = ("int8", "int4", "int2")
CALIB = CalibrationOptions(samples=16, seq_len=32, sensitivity=False, collect_inputs=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("requant")
    src, text = root / "src", root / "text.txt"
    write_synthetic_checkpoint(src, hidden=64, intermediate=32, experts=8, layers=3, heads=4, kv_heads=2,
                               vocab=64, dtype="F32", max_position_embeddings=64)
    text.write_text(" ".join(f"w{t}" for t in np.random.default_rng(0).integers(0, 64, 2000)))
    return src, text


@pytest.fixture(scope="module")
def calibrated(source, tmp_path_factory) -> Path:
    """An rtn bundle whose calibration collected the experts' routed inputs (never modified: copy it)."""
    src, text = source
    bundle = tmp_path_factory.mktemp("calibrated") / "bundle"
    export(str(src), bundle, ExportOptions(precisions=PRECISIONS, quantizer="rtn"))
    commit(bundle, measure(bundle, [text], CALIB))
    return bundle


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _check_complete(bundle: Path):
    """Every listed file verifies, and nothing else lies in the bundle."""
    m = read_manifest(bundle)
    for rel in m.files:
        verify_file(bundle, m, rel)
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json", ".dymoe.lock"} == set(m.files)
    return m


def _logits(bundle: Path, precision: str) -> np.ndarray:
    b = Bundle(bundle)
    model = MoEModel(b, StaticExperts(b, precision))
    return model.forward(np.arange(1, 25) % 64, model.new_cache(), all_logits=True)


def test_gptq_uses_each_experts_inputs_and_falls_back_where_too_few(calibrated, tmp_path):
    bundle = _copy(calibrated, tmp_path)
    before = read_manifest(bundle)
    reader_meta = read_calibration(bundle, before).expert_inputs
    kept = np.array(reader_meta.kept)
    min_tokens = int(np.median(kept)) + 1  # about half the experts fall short
    assert (kept < min_tokens).any() and (kept >= min_tokens).any()

    m = requantize(bundle, RequantizeOptions(QuantizerOptions("gptq", min_tokens=min_tokens)))
    _check_complete(bundle)
    assert m.quantization.method == "gptq" and m.quantization.revision
    assert m.quantization.precisions == list(PRECISIONS)
    for entry in m.experts:
        n = int(kept[entry.layer][entry.expert])
        assert entry.variants["fp32"] == before.expert(entry.layer, entry.expert).variants["fp32"]
        for p in INTEGER:
            v = entry.variants[p]
            assert v.path != before.expert(entry.layer, entry.expert).variants[p].path
            assert v.calibration_tokens == n
            if n >= min_tokens:
                assert v.quantizer == "gptq" and v.quantizer_note is None
            else:
                assert v.quantizer == "hqq" and f"{n} routed calibration tokens < {min_tokens}" in v.quantizer_note
            if n:
                assert 0 < v.routed_output_rel_error < 1
    for rel in before.files:  # the rtn variants are gone from disk
        if rel not in m.files:
            assert not (bundle / rel).exists()
    # the requantized bundle runs and stays near fp32
    fp32, int4 = _logits(bundle, "fp32"), _logits(bundle, "int4")
    assert np.linalg.norm(int4 - fp32) / np.linalg.norm(fp32) < 0.35


def test_gptq_lowers_the_error_on_routed_inputs(calibrated, tmp_path):
    """Per precision, the mean output error on each expert's routed tokens: gptq < hqq < rtn."""
    means = {}
    for name in ("rtn", "hqq", "gptq"):
        bundle = _copy(calibrated, tmp_path / name)
        m = requantize(bundle, RequantizeOptions(QuantizerOptions(name, min_tokens=8)))
        for p in INTEGER:
            errs = [e.variants[p].routed_output_rel_error for e in m.experts
                    if e.variants[p].routed_output_rel_error is not None and e.variants[p].quantizer == name]
            assert len(errs) >= 20  # most experts saw at least 8 tokens
            means[(name, p)] = float(np.mean(errs))
    for p in ("int4", "int2"):
        assert means[("gptq", p)] < means[("hqq", p)] < means[("rtn", p)], means


def test_interrupted_requantize_leaves_the_bundle_usable_and_resumes(calibrated, tmp_path, monkeypatch):
    bundle = _copy(calibrated, tmp_path)
    manifest_before = (bundle / "manifest.json").read_bytes()
    real = requantize_mod.write_expert
    calls, interrupt_at = [], [10]

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(requantize_mod, "write_expert", interrupted)
    opts = RequantizeOptions(QuantizerOptions("hqq"))
    with pytest.raises(KeyboardInterrupt):
        requantize(bundle, opts)
    assert (bundle / "manifest.json").read_bytes() == manifest_before
    m = read_manifest(bundle)
    for rel in m.files:
        verify_file(bundle, m, rel)
    assert np.isfinite(_logits(bundle, "int4")).all()  # still the old variants, intact
    assert (bundle / JOURNAL).is_file()

    calls.clear()
    interrupt_at[0] = 0
    m = requantize(bundle, opts)
    total = len(m.experts) * len(INTEGER)
    assert len(calls) == total - 9  # the 9 finished before the interruption were kept
    assert not (bundle / JOURNAL).exists()
    _check_complete(bundle)

    calls.clear()
    again = requantize(bundle, opts)  # same settings, same inputs: nothing to do
    assert calls == [] and again.quantization.revision == m.quantization.revision


def test_gptq_without_collected_inputs_is_a_clear_error(source, tmp_path):
    src, _ = source
    bundle = tmp_path / "plain"
    export(str(src), bundle, ExportOptions(precisions=("fp32", "int4"), quantizer="rtn"))
    with pytest.raises(BundleError, match="no calibration with expert inputs") as e:
        requantize(bundle, RequantizeOptions(QuantizerOptions("gptq")))
    assert "--collect-inputs" in e.value.hint
    r = subprocess.run([sys.executable, "-m", "dymoe.cli", "requantize", str(bundle), "--quantizer", "gptq"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--collect-inputs" in r.stderr


def test_requantize_needs_a_float_variant(source, tmp_path):
    src, _ = source
    bundle = tmp_path / "int_only"
    export(str(src), bundle, ExportOptions(precisions=("int4",), quantizer="rtn"))
    with pytest.raises(BundleError, match="no fp32 or fp16 experts"):
        requantize(bundle, RequantizeOptions(QuantizerOptions("hqq")))


def test_requantize_can_add_a_precision(calibrated, tmp_path):
    src_bundle = tmp_path / "src"
    bundle = _copy(calibrated, src_bundle)
    m = requantize(bundle, RequantizeOptions(QuantizerOptions("hqq"), precisions=("int4",)))
    assert [e.variants["int4"].quantizer for e in m.experts] == ["hqq"] * len(m.experts)
    assert {e.variants["int8"].quantizer for e in m.experts} == {"rtn"}  # untouched
    _check_complete(bundle)
    with pytest.raises(InputError, match="only integer precisions"):
        requantize(bundle, RequantizeOptions(QuantizerOptions("hqq"), precisions=("fp16",)))


def test_export_with_gptq_runs_calibration_and_resumes(source, tmp_path, monkeypatch):
    src, text = source
    out = tmp_path / "gptq"
    opts = ExportOptions(precisions=("fp32", "int4", "int2"))
    gptq = GptqOptions(calibration_data=(str(text),), min_tokens=8)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(requantize_mod, "requantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(str(src), out, opts, gptq)
    stage1 = read_manifest(out)  # a complete data-free bundle, already calibrated
    assert stage1.quantization.method == "hqq" and stage1.calibration
    backbone_mtime = (out / stage1.backbone.embed).stat().st_mtime_ns

    monkeypatch.undo()
    m = export_pipeline(str(src), out, opts, gptq)  # the same command resumes at the gptq stage
    assert m.quantization.method == "gptq"
    assert (out / m.backbone.embed).stat().st_mtime_ns == backbone_mtime
    made = {e.variants["int4"].quantizer for e in m.experts}
    assert "gptq" in made and made <= {"gptq", "hqq"}
    _check_complete(out)
    with pytest.raises(BundleError, match="already holds a complete bundle"):
        export_pipeline(str(src), out, opts, gptq)
    # stopped after requantize switched the manifest in, before its cleanup: the rerun finishes it
    (out / JOURNAL).write_text('{"fingerprint": "x"}\n')
    again = export_pipeline(str(src), out, opts, gptq)
    assert again.quantization.revision == m.quantization.revision
    assert not (out / JOURNAL).exists()
    _check_complete(out)


def test_export_gptq_cli(source, tmp_path):
    src, text = source
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out), "--precisions", "fp16,int4"]
    r = subprocess.run(base + ["--quantizer", "gptq"], capture_output=True, text=True)
    assert r.returncode == 1 and "--calibration-data" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run(base + ["--quantizer", "gptq", "--calibration-data", str(text), "--gptq-min-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["method"] == "gptq"
    r = subprocess.run([sys.executable, "-m", "dymoe.cli", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "gptq" in r.stdout


def test_requantize_cli(calibrated, tmp_path):
    bundle = _copy(calibrated, tmp_path)
    r = subprocess.run([sys.executable, "-m", "dymoe.cli", "requantize", str(bundle), "--quantizer", "gptq",
                        "--precisions", "int2", "--gptq-min-tokens", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "gptq" in r.stdout and "requantized" in r.stderr and "re-measure" in r.stderr  # calibration is stale
    m = _check_complete(bundle)
    assert {e.variants["int2"].quantizer for e in m.experts} <= {"gptq", "hqq"}
    assert {e.variants["int4"].quantizer for e in m.experts} == {"rtn"}
    r = subprocess.run([sys.executable, "-m", "dymoe.cli", "requantize", str(bundle), "--quantizer", "best"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown quantizer 'best'" in r.stderr and "Traceback" not in r.stderr


def test_returning_to_earlier_settings_keeps_every_listed_file(calibrated, tmp_path):
    """hqq, then rtn for int2 only, then hqq again: the third run's int4 names are the first run's,
    still listed; they must be kept as they are, not rewritten or deleted."""
    bundle = _copy(calibrated, tmp_path)
    hqq = RequantizeOptions(QuantizerOptions("hqq"))
    first = requantize(bundle, hqq)
    requantize(bundle, RequantizeOptions(QuantizerOptions("rtn"), precisions=("int2",)))
    int4 = {rel: (bundle / rel).stat().st_mtime_ns for rel in (e.variants["int4"].path for e in first.experts)}
    third = requantize(bundle, hqq)
    _check_complete(bundle)
    assert [e.variants["int4"].path for e in third.experts] == list(int4)
    assert all((bundle / rel).stat().st_mtime_ns == t for rel, t in int4.items())  # not rewritten
    assert {e.variants["int2"].quantizer for e in third.experts} == {"hqq"}


def test_a_run_stopped_after_its_manifest_switch_is_finished_by_the_next(calibrated, tmp_path, monkeypatch):
    bundle = _copy(calibrated, tmp_path)

    def stop(_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(requantize_mod, "fsync_dir", stop)  # right after the manifest write
    opts = RequantizeOptions(QuantizerOptions("hqq"))
    with pytest.raises(KeyboardInterrupt):
        requantize(bundle, opts)
    m = read_manifest(bundle)
    assert m.quantization.method == "hqq"
    for rel in m.files:  # the new manifest is complete; only leftovers remain
        verify_file(bundle, m, rel)
    assert (bundle / JOURNAL).exists()
    monkeypatch.undo()
    requantize(bundle, opts)
    _check_complete(bundle)
    assert not (bundle / JOURNAL).exists()


@pytest.mark.parametrize("precisions,data,expected", [
    (("int4", "int2"), True, "needs a float precision"),
    (("fp16",), True, "nothing to quantize"),
    (("fp16", "int4"), "missing", "--calibration-data: data file not found"),
    (("fp16", "int4"), "short", "fewer than one sample"),
])
def test_export_gptq_checks_its_inputs_before_exporting(source, tmp_path, precisions, data, expected):
    src, text = source
    path = {True: text, "missing": tmp_path / "nope.txt", "short": tmp_path / "short.txt"}[data]
    if data == "short":
        path.write_text("w1 w2 w3")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=expected):
        export_pipeline(str(src), out, ExportOptions(precisions=precisions), GptqOptions(calibration_data=(str(path),)))
    assert not out.exists()  # nothing was exported before the error
