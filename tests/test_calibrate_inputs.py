"""``dymoe calibrate --collect-inputs``: the reservoir sample of each expert's routed inputs, its
files in the bundle, and the reader a data-driven quantizer (GPTQ) uses.

The end-to-end tests use ``test_calibrate``'s ``routed`` bundle, whose hidden state never changes:
token ``w<g>`` reaches every layer's experts as exactly c * e_g (RMSNorm of a basis vector, norm
weights 1), and ``ROUTES`` says which experts it goes to, so every kept row is known in advance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_calibrate import (  # noqa: F401 (routed, routed_text: the fixtures this module reuses)
    EPS,
    LAYERS,
    PATTERN,
    ROUTES,
    SAMPLES,
    SEQ,
    E,
    H,
    _snapshot,
    dymoe,
    routed,
    routed_text,
)

from dymoe.bundle.calibration import parse, read_calibration
from dymoe.bundle.errors import BundleError, ChecksumError, InputError
from dymoe.bundle.inputs import load_expert_inputs, memory_bound
from dymoe.bundle.manifest import read_manifest
from dymoe.bundle.naming import CALIBRATION_NAME, INPUTS_DIRNAME
from dymoe.calibration.inputs import InputRecorder, require_memory
from dymoe.calibration.options import CalibrationOptions
from dymoe.calibration.run import commit, measure

CAP = 16  # per window the experts get [12, 10, 4, 2, 0, 2, 2, 0] tokens: x4 windows, 0 and 1 overflow, 2 fills
C = 1.0 / math.sqrt(1.0 / H + EPS)  # every row is C times a basis vector


def offered(n: int, hidden: int = 3, start: int = 0) -> np.ndarray:
    """Rows whose first column is their index (exact in fp16 below 2048), so a kept row names itself."""
    rows = np.zeros((n, hidden), dtype=np.float32)
    rows[:, 0] = np.arange(start, start + n)
    rows[:, 1:] = 0.5
    return rows


def record(batches: list[int], cap: int, seed: int = 0, experts: int = 1) -> InputRecorder:
    rec = InputRecorder(1, experts, 3, cap, seed)
    for e in range(experts):
        start = 0
        for n in batches:
            rec.add(0, e, offered(n, start=start))
            start += n
    return rec


# --- the reservoir ---------------------------------------------------------------------------


@pytest.mark.parametrize("batches, cap", [
    ([5], 8), ([8], 8), ([3, 0, 4], 8), ([1] * 7, 7), ([100], 100), ([70, 30], 1024),
])
def test_below_cap_keeps_every_row_in_order(batches, cap):
    rec = record(batches, cap)
    n = sum(batches)
    got = rec.rows(0, 0)
    assert got.dtype == np.float16 and got.shape == (n, 3)
    np.testing.assert_array_equal(got.astype(np.float32), offered(n))
    assert rec.seen == [[n]] and rec.kept == [[n]]


@pytest.mark.parametrize("batches, cap", [([9], 8), ([100], 5), ([3, 3, 3, 3], 4), ([1] * 30, 3), ([4, 60, 1], 1)])
def test_at_cap_keeps_cap_distinct_offered_rows(batches, cap):
    rec = record(batches, cap)
    n = sum(batches)
    got = rec.rows(0, 0).astype(np.float32)
    assert got.shape == (cap, 3) and rec.seen == [[n]] and rec.kept == [[cap]]
    index = got[:, 0].astype(int)
    assert len(set(index.tolist())) == cap and all(0 <= i < n for i in index)
    np.testing.assert_array_equal(got, offered(n)[index])
    np.testing.assert_array_equal(record(batches, cap).rows(0, 0), rec.rows(0, 0))  # same seed, same sample
    others = [record(batches, cap, seed=s).rows(0, 0) for s in (1, 2, 3)]
    assert any(not np.array_equal(o, rec.rows(0, 0)) for o in others)


@pytest.mark.parametrize("batches", [[40], [10, 30], [1] * 40])
def test_every_row_is_equally_likely_to_be_kept(batches):
    # 2000 experts = 2000 independent draws; row i of 40 is kept with probability 4/40, so about
    # 200 times (sd 13). Keeping the wrong one of two rows drawn to one slot in the same call would
    # keep the last row about 10 times.
    rec = record(batches, cap=4, experts=2000)
    counts = np.zeros(40, dtype=int)
    for e in range(2000):
        np.add.at(counts, rec.rows(0, e)[:, 0].astype(int), 1)
    assert counts.sum() == 2000 * 4
    assert np.all(np.abs(counts - 200) < 70), counts


def test_streams_are_per_expert_and_buffers_grow_lazily():
    rec = InputRecorder(2, 3, 3, 1000, seed=7)
    rec.add(1, 2, offered(50))
    assert rec.seen == [[0, 0, 0], [0, 0, 50]]
    assert rec._rows[1][2].shape[0] < 1000 and rec._rows[0][0] is None  # not preallocated at the cap
    assert rec.rows(0, 1).shape == (0, 3)
    # an expert's sample does not depend on what other experts were offered
    a, b = InputRecorder(1, 2, 3, 4, seed=7), InputRecorder(1, 2, 3, 4, seed=7)
    a.add(0, 0, offered(30))
    b.add(0, 1, offered(99))
    b.add(0, 0, offered(30))
    np.testing.assert_array_equal(a.rows(0, 0), b.rows(0, 0))
    with pytest.raises(ValueError, match="hidden size 3"):
        rec.add(0, 0, np.zeros((2, 4), dtype=np.float32))


def test_memory_bound_refuses_what_does_not_fit():
    assert memory_bound(7, 16, 192, 1024) == 7 * 16 * 1024 * 192 * 2
    require_memory(7, 16, 192, 1024, available=2 * memory_bound(7, 16, 192, 1024))
    require_memory(7, 16, 192, 1024, available=None)  # unknown: not refused
    with pytest.raises(InputError) as e:
        require_memory(48, 128, 2048, 1024, available=16 * 2**30)
    assert "24.00 GiB" in e.value.message and e.value.hint == "use --inputs-per-expert 341 or less"
    assert memory_bound(48, 128, 2048, 341) <= 8 * 2**30 < memory_bound(48, 128, 2048, 342)
    with pytest.raises(InputError) as e:
        require_memory(48, 128, 2048, 1024, available=2**20)
    assert "without --collect-inputs" in e.value.hint


# --- calibrate --collect-inputs --------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(routed) -> Path:  # noqa: F811 (the imported fixture)
    return routed


@pytest.fixture(scope="module")
def text(routed_text) -> Path:  # noqa: F811 (the imported fixture)
    return routed_text


OPTIONS = CalibrationOptions(samples=SAMPLES, seq_len=SEQ, sensitivity=False, collect_inputs=True,
                             inputs_per_expert=CAP)


@pytest.fixture(scope="module")
def measured(bundle, text):
    return measure(bundle, [text], OPTIONS)


def expected_rows(expert: int) -> np.ndarray:
    """What the expert receives over the windows, in order (every window is PATTERN; any layer)."""
    rows = np.zeros((SAMPLES * sum(expert in ROUTES[t] for t in PATTERN), H), dtype=np.float32)
    tokens = [t for _ in range(SAMPLES) for t in PATTERN if expert in ROUTES[t]]
    rows[np.arange(len(tokens)), tokens] = C
    return rows


def test_inputs_are_recorded_and_deterministic(measured, bundle, text):
    cal = measured.calibration
    info = cal.expert_inputs
    assert info.cap == CAP and info.seed == OPTIONS.seed and info.dtype == "F16"
    assert info.files == [f"{INPUTS_DIRNAME}/layer_{layer:03d}.safetensors" for layer in range(LAYERS)]
    assert list(measured.inputs) == info.files
    for layer in range(LAYERS):
        assert info.seen[layer] == [x.tokens for x in cal.importance[layer].experts]
        assert info.kept[layer] == [min(x.tokens, CAP) for x in cal.importance[layer].experts]
    assert info.kept[0] == [16, 16, 16, 8, 0, 8, 8, 0]
    again = measure(bundle, [text], OPTIONS)
    assert again.inputs == measured.inputs and again.calibration.to_json() == cal.to_json()
    other = measure(bundle, [text], dataclasses.replace(OPTIONS, seed=1))
    assert other.inputs != measured.inputs  # another seed, another sample of the overflowing experts


def test_calibration_json_without_inputs_still_reads(measured):
    data = json.loads(measured.calibration.to_json())
    assert parse(json.dumps(data)).expert_inputs == measured.calibration.expert_inputs
    del data["expert_inputs"]  # as written before --collect-inputs existed
    assert parse(json.dumps(data)).expert_inputs is None


def test_committed_inputs_read_back_as_routed(measured, bundle):
    commit(bundle, measured)
    manifest = read_manifest(bundle)
    cal = read_calibration(bundle, manifest)
    assert cal.to_json() == measured.calibration.to_json()
    for rel, data in measured.inputs.items():
        assert (bundle / rel).read_bytes() == data
        entry = manifest.files[rel]
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    reader = load_expert_inputs(bundle, manifest, cal)
    for layer in range(LAYERS):
        for e in range(E):
            rows = reader.rows(layer, e)
            want = expected_rows(e)
            assert rows.dtype == np.float32 and rows.shape == (min(len(want), CAP), H)
            assert reader.seen(layer, e) == len(want)
            np.testing.assert_array_equal(rows, rows.astype(np.float16).astype(np.float32))  # fp16 values
            if len(want) <= CAP:  # every row, in order
                np.testing.assert_allclose(rows, want, rtol=1e-3, atol=0)
            else:  # a sample: each row is one the expert received
                distinct = np.unique(want, axis=0)
                assert all(np.abs(distinct - r).max(axis=1).min() <= 1e-3 * C for r in rows)


def test_rerun_without_inputs_removes_them(measured, bundle, text):
    commit(bundle, measured)
    folder = bundle / INPUTS_DIRNAME
    (folder / "layer_099.safetensors").write_bytes(b"left by a crash")  # unlisted: swept too
    plain = measure(bundle, [text], CalibrationOptions(samples=1, seq_len=SEQ, sensitivity=False))
    assert plain.calibration.expert_inputs is None and plain.inputs == {}
    commit(bundle, plain)
    manifest = read_manifest(bundle)
    assert not folder.exists()
    assert not [rel for rel in manifest.files if rel.startswith(INPUTS_DIRNAME)]
    assert CALIBRATION_NAME in manifest.files
    with pytest.raises(BundleError, match="has no collected expert inputs") as e:
        load_expert_inputs(bundle, manifest, read_calibration(bundle, manifest))
    assert "--collect-inputs" in e.value.hint
    with pytest.raises(ValueError):  # the files must come with the record that lists them
        commit(bundle, measured.calibration)


def test_tampered_input_file_is_rejected(measured, bundle, tmp_path):
    commit(bundle, measured)
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    path = copy / measured.calibration.expert_inputs.files[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    manifest = read_manifest(copy)
    reader = load_expert_inputs(copy, manifest, read_calibration(copy, manifest))
    assert reader.rows(0, 0).shape == (CAP, H)  # each layer file is checked when first opened
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        reader.rows(1, 0)


def test_memory_check_runs_before_measuring(bundle, text, monkeypatch):
    monkeypatch.setattr("dymoe.calibration.run.available_memory", lambda: 1024)
    monkeypatch.setattr("dymoe.calibration.data.load", lambda paths: pytest.fail("data loaded before the check"))
    with pytest.raises(InputError, match="more than half of the"):
        measure(bundle, [text], OPTIONS)


def test_cli_collect_inputs(measured, bundle, text):
    args = ["calibrate", bundle, "--data", text, "--samples", SAMPLES, "--seq-len", SEQ, "--no-sensitivity",
            "--no-report"]
    before = _snapshot(bundle)
    proc = dymoe(*args, "--collect-inputs", "--inputs-per-expert", 0)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and "--inputs-per-expert 0 must be at least 1" in proc.stderr
    assert _snapshot(bundle) == before

    proc = dymoe(*args, "--collect-inputs", "--inputs-per-expert", CAP)
    assert proc.returncode == 0, proc.stderr
    kept = sum(map(sum, measured.calibration.expert_inputs.kept))
    assert f"kept {kept:,} routed inputs" in proc.stderr and "MiB" in proc.stderr
    for rel, data in measured.inputs.items():  # another process, the same bytes
        assert (bundle / rel).read_bytes() == data
    assert (bundle / CALIBRATION_NAME).read_text() == measured.calibration.to_json()
