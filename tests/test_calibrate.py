"""``dymoe calibrate`` on crafted bundles whose truth is known in advance.

The bundles come from synthetic Mixtral-layout checkpoints (numpy only, no torch) whose weights are
then edited:

* ``routed``: token ``w<g>`` embeds as the basis vector e_g, attention adds nothing (q, k, o = 0,
  so attention is uniform and ``attn_colsum`` falls with position), every layer has the same router
  sending w1..w4 to fixed expert pairs with fixed weights, and the experts of layers 0 and 1 output
  zero: the hidden state never changes, so routing counts, shares, weights and heavy hitters follow
  from the text alone and the look-ahead predictor is exact (recall 1.0).
* ``fragile``: random attention and experts, but layer 1's expert down-projections are scaled up 40x:
  lowering or skipping that layer's experts must hurt the most. Routing is again fixed per token
  (a seeded random expert pair per token, logit margins of about 1), so a small upstream change
  cannot flip which experts the fragile layer uses, which would make an upstream layer look
  fragile too.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dymoe.bundle.calibration import read_calibration
from dymoe.bundle.errors import BundleError, ChecksumError
from dymoe.bundle.manifest import read_manifest
from dymoe.bundle.naming import CALIBRATION_NAME
from dymoe.calibration import stats
from dymoe.calibration.options import CalibrationOptions
from dymoe.calibration.run import commit, measure
from dymoe.calibration.sensitivity import PerturbedExperts
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

PRECISIONS = ("fp32", "int8", "int4", "int2")
H, E, LAYERS, EPS = 64, 8, 3, 1e-5  # write_synthetic_checkpoint's rms_norm_eps is 1e-5
# token w<g> -> (top-1 expert, top-2 expert); router rows get 0.25 and 0.125 on input dimension g
ROUTES = {1: (0, 1), 2: (0, 2), 3: (3, 1), 4: (5, 6)}
PATTERN = [1, 2, 1, 3, 1, 2, 1, 4, 1, 2, 1, 3, 1, 2, 1, 4]  # per 16 tokens: w1 x8, w2 x4, w3 x2, w4 x2
SEQ, SAMPLES = 16, 4


def _edit_checkpoint(src: Path, edit) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        save_file({name: np.ascontiguousarray(edit(name, t), dtype=np.float32) for name, t in tensors.items()},
                  src / shard)


def _export(root: Path, edit) -> Path:
    src, bundle = root / "src", root / "bundle"
    write_synthetic_checkpoint(src, hidden=H, intermediate=32, experts=E, layers=LAYERS, heads=4, kv_heads=2,
                               vocab=64, dtype="F32", max_position_embeddings=64)
    _edit_checkpoint(src, edit)
    export(str(src), bundle, ExportOptions(precisions=PRECISIONS, backbone_precision="fp32"))  # exact expectations
    return bundle


def _routed_edit(name: str, t: np.ndarray) -> np.ndarray:
    if name == "model.embed_tokens.weight":
        return np.eye(64, H, dtype=np.float32)
    if any(f"self_attn.{p}_proj" in name for p in "qko"):
        return np.zeros_like(t)
    if name.endswith("block_sparse_moe.gate.weight"):
        router = np.zeros_like(t)
        for g, (first, second) in ROUTES.items():
            router[first, g], router[second, g] = 0.25, 0.125
        return router
    if ".w2.weight" in name and f"layers.{LAYERS - 1}." not in name:
        return np.zeros_like(t)
    return t


FRAGILE_PAIRS = [np.random.default_rng(5).choice(E, 2, replace=False) for _ in range(64)]


def _fragile_edit(name: str, t: np.ndarray) -> np.ndarray:
    if name == "model.embed_tokens.weight":
        return np.eye(64, H, dtype=np.float32)
    if name.endswith("block_sparse_moe.gate.weight"):
        router = np.zeros_like(t)
        for g, (first, second) in enumerate(FRAGILE_PAIRS):
            router[first, g], router[second, g] = 0.25, 0.125
        return router
    if name == "lm_head.weight":
        return t * 20  # peaked next-token distributions
    if "layers.1." in name and ".w2.weight" in name:
        return t * 40
    return t


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("routed"), _routed_edit)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("fragile"), _fragile_edit)


@pytest.fixture(scope="module")
def routed_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "routed.txt"
    path.write_text(" ".join(f"w{t}" for t in PATTERN * 8))  # 8 windows of 16 tokens, all alike
    return path


@pytest.fixture(scope="module")
def random_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "random.txt"
    path.write_text(" ".join(f"w{t}" for t in np.random.default_rng(0).integers(0, 64, 2000)))
    return path


@pytest.fixture(scope="module")
def routed_cal(routed, routed_text):
    return measure(routed, [routed_text], CalibrationOptions(samples=SAMPLES, seq_len=SEQ)).calibration


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dymoe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dymoe.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


# --- exactness -------------------------------------------------------------------------------


def test_known_routing_gives_exact_counts_shares_and_weights(routed_cal):
    cal = routed_cal
    per_window = np.zeros(E, dtype=np.int64)
    for token in PATTERN:
        for e in ROUTES[token]:
            per_window[e] += 1
    assert per_window.tolist() == [12, 10, 4, 2, 0, 2, 2, 0]
    c = 1.0 / math.sqrt(1.0 / H + EPS)  # RMSNorm of a basis vector
    s = 1.0 / (1.0 + math.exp(-0.125 * c))  # top-2 renormalised softmax of logits 0.25 c and 0.125 c
    assert cal.settings.samples == SAMPLES and cal.settings.data_tokens == 8 * SEQ
    for layer in cal.importance:
        assert layer.tokens == SAMPLES * SEQ
        got = [x.tokens for x in layer.experts]
        assert got == (SAMPLES * per_window).tolist()
        assert [x.share for x in layer.experts] == (per_window / (SEQ * 2)).tolist()  # exact: 12/32, 10/32, ...
        mass = np.zeros(E)
        for token in PATTERN:
            mass[ROUTES[token][0]] += s
            mass[ROUTES[token][1]] += 1 - s
        mass *= SAMPLES
        assert [x.gate_mass for x in layer.experts] == pytest.approx(mass.tolist(), rel=1e-5)
        assert [x.gate_share for x in layer.experts] == pytest.approx((mass / mass.sum()).tolist(), rel=1e-5)
        first = {0: s, 1: 1 - s, 2: 1 - s, 3: s, 5: s, 6: 1 - s}
        for e, w in first.items():
            assert layer.experts[e].weight_mean == pytest.approx(w, rel=1e-5)
            assert layer.experts[e].weight_percentiles == pytest.approx([w] * 3, rel=1e-5)
        assert layer.experts[4].weight_mean == 0 and layer.experts[4].tokens == 0
        assert layer.skew.gini == pytest.approx(stats.gini(mass), rel=1e-5)
        assert layer.skew.top_share == pytest.approx(stats.top_share(mass, 0.2), rel=1e-5)
        assert layer.skew.coverage_count == stats.coverage_count(mass, 0.8)


def test_heavy_hitters_follow_uniform_attention(routed_cal):
    # q = k = 0: each query spreads attention evenly over the tokens it sees, so the accumulated
    # attention falls with position and the top 10 % of 16 tokens (2) are positions 0 and 1: w1, w2
    for layer in routed_cal.importance:
        assert layer.heavy_hitter_tokens == SAMPLES * 2
        assert [x.heavy_hitters for x in layer.experts] == [2 * SAMPLES, SAMPLES, SAMPLES, 0, 0, 0, 0, 0]


def test_output_contribution_matches_numpy(routed_cal, routed):
    src = routed.parent / "src"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    layer = LAYERS - 1
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    tensors = load_file(src / index["weight_map"][p + "0.w1.weight"])
    c = 1.0 / math.sqrt(1.0 / H + EPS)
    s = 1.0 / (1.0 + math.exp(-0.125 * c))

    def norm_out(e: int, g: int) -> float:
        x = np.zeros(H)
        x[g] = c
        w1, w3, w2 = (tensors[f"{p}{e}.{n}.weight"].astype(np.float64) for n in ("w1", "w3", "w2"))
        a = w1 @ x
        return float(np.linalg.norm(w2 @ (a / (1 + np.exp(-a)) * (w3 @ x))))

    for e in range(E):
        terms = [(s if ROUTES[t][0] == e else 1 - s) * norm_out(e, t) for t in PATTERN if e in ROUTES[t]]
        expected = sum(terms) / len(terms) if terms else 0.0
        assert routed_cal.importance[layer].experts[e].output_contribution == pytest.approx(expected, rel=1e-4)
    for lower in range(LAYERS - 1):  # zero experts contribute nothing, and lowering them changes nothing
        assert all(x.output_contribution == 0 for x in routed_cal.importance[lower].experts)
        assert all(e.kl == 0 for e in routed_cal.sensitivity.entries if e.layer == lower)


def test_identical_routers_and_states_predict_perfectly(routed_cal):
    preds = routed_cal.prediction
    # layers 1 and 2 from one layer back, layer 2 from two back; two sources; k = 2 and 4
    assert len(preds) == (2 + 1) * 2 * 2
    assert {(p.layer, p.distance) for p in preds} == {(1, 1), (2, 1), (2, 2)}
    assert all(p.recall == 1.0 for p in preds)


def test_fragile_layer_ranks_most_sensitive(fragile, random_text):
    cal = measure(fragile, [random_text], CalibrationOptions(samples=4, seq_len=32)).calibration
    assert cal.settings.modes == ["int8", "int4", "int2", "skip"] and cal.settings.retentions == [0.5]
    for mode in cal.settings.modes:
        for r in (0.0, 0.5):
            kls = [cal.entry(layer, mode, r).kl for layer in range(LAYERS)]
            assert int(np.argmax(kls)) == 1, (mode, r, kls)
    # (a random model's perplexity is meaningless, so only its change in size is compared)
    skip = [abs(cal.entry(layer, "skip", 0.0).ppl_delta) for layer in range(LAYERS)]
    assert int(np.argmax(skip)) == 1
    # lowering only the non-critical half hurts less than lowering every selected expert
    assert cal.entry(1, "skip", 0.5).kl < cal.entry(1, "skip", 0.0).kl
    # the fragile layer keeps the most experts at high precision under the same budget
    budget = 3 * max(cal.entry(0, "skip", 0.0).kl, cal.entry(2, "skip", 0.0).kl)  # sturdy layers fit when skipped
    rec = measure_schedule(cal, budget)
    assert rec[0] == rec[2] == 0.5 and rec[1] == 1.0  # 0.5: keep 1 of 2, the least the runtime keeps


def measure_schedule(cal, target):
    from dymoe.calibration import schedule as sched
    from dymoe.calibration.run import layer_losses

    return sched.recommend(layer_losses(cal.sensitivity, "skip", LAYERS), target)


# --- determinism, commit, interruption -------------------------------------------------------


def test_cli_run_is_deterministic_and_listed_in_manifest(routed, routed_text, tmp_path):
    before = read_manifest(routed)
    proc = dymoe("calibrate", routed, "--data", routed_text, "--samples", SAMPLES, "--seq-len", SEQ,
                 "--report", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    assert "Gini" in proc.stdout and "wrote" in proc.stderr
    first = (routed / CALIBRATION_NAME).read_bytes()
    manifest = read_manifest(routed)
    assert manifest.calibration == CALIBRATION_NAME
    entry = manifest.files[CALIBRATION_NAME]
    assert entry.bytes == len(first) and entry.sha256 == hashlib.sha256(first).hexdigest()
    assert {k: v for k, v in manifest.files.items() if k != CALIBRATION_NAME} == before.files
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "report.md", "importance_heatmap.png", "skew_by_depth.png", "sensitivity_by_depth.png",
        "prediction_recall.png", "retention_schedule.png"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Gini" in md and "recommended" in md and "calibration took" in md

    # a second run with the same seed, in this process: byte-identical
    again = measure(routed, [routed_text], CalibrationOptions(samples=SAMPLES, seq_len=SEQ)).calibration
    assert again.to_json().encode() == first
    commit(routed, again)
    assert (routed / CALIBRATION_NAME).read_bytes() == first
    assert read_calibration(routed, read_manifest(routed)).to_json().encode() == first

    # --report-only rebuilds the report from calibration.json alone
    proc = dymoe("calibrate", routed, "--report-only", "--report", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    rebuilt = (tmp_path / "again" / "report.md").read_text()
    assert "calibration took" not in rebuilt
    assert rebuilt.splitlines() == [line for line in md.splitlines() if "calibration took" not in line]
    assert len(list((tmp_path / "again").glob("*.png"))) == 5


def test_reference_cache_is_exact(fragile, random_text, monkeypatch):
    """Layers below the perturbed one are taken from the reference pass: the same numbers as
    computing them again, and retention 1 (nothing lowered) reproduces the reference exactly."""
    from dymoe.calibration.collect import ReferenceCache
    from dymoe.calibration.run import Reference
    from dymoe.calibration.sensitivity import Perturbation
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.maths import log_softmax
    from dymoe.runtime.model import MoEModel

    opts = CalibrationOptions(samples=3, sensitivity_samples=2, seq_len=32)
    cached = measure(fragile, [random_text], opts).calibration.to_json()
    monkeypatch.setattr(ReferenceCache, "get", lambda self, window, step: None)
    assert measure(fragile, [random_text], opts).calibration.to_json() == cached

    from dymoe.calibration.bank import ExpertBank
    from dymoe.calibration.collect import CollectingExperts
    from dymoe.calibration.predict import PredictionTally

    bundle = Bundle(fragile)
    bank = ExpertBank(bundle)
    ids = np.random.default_rng(1).integers(0, 64, 32)
    from dymoe.runtime.predictor import Predictor

    ref_exec = CollectingExperts(bank, 0.1, PredictionTally(Predictor(bundle), [2]), ReferenceCache(set()))
    ref_logits = MoEModel(bundle, ref_exec).forward(ids, MoEModel(bundle, ref_exec).new_cache(), all_logits=True)
    same = PerturbedExperts(bank, Perturbation(1, "skip", 1.0))
    logits = MoEModel(bundle, same).forward(ids, MoEModel(bundle, same).new_cache(), all_logits=True)
    assert np.array_equal(logits, ref_logits)
    kl, nll = Reference.of(ref_logits, ids).compare(logits, ids)
    assert kl == 0.0 and nll == pytest.approx(float(stats.nll_rows(ref_logits, ids).sum()))
    lowered = PerturbedExperts(bank, Perturbation(1, "int2", 0.0))
    low = MoEModel(bundle, lowered).forward(ids, MoEModel(bundle, lowered).new_cache(), all_logits=True)
    kl, nll = Reference.of(ref_logits, ids).compare(low, ids)
    assert kl == pytest.approx(float(stats.kl_rows(log_softmax(ref_logits), low).sum()), rel=1e-9)
    assert nll == pytest.approx(float(stats.nll_rows(low, ids).sum()), rel=1e-12)


def test_other_seed_draws_other_windows(fragile, random_text):
    opts = dict(samples=2, seq_len=32, sensitivity=False)
    a = measure(fragile, [random_text], CalibrationOptions(seed=1, **opts)).calibration
    b = measure(fragile, [random_text], CalibrationOptions(seed=2, **opts)).calibration
    assert a.sensitivity is None and a.schedule is None
    assert a.to_json() != b.to_json()


def test_interrupted_run_leaves_bundle_unchanged(fragile, random_text, monkeypatch):
    before = _snapshot(fragile)
    calls = {"n": 0}
    original = PerturbedExperts.run

    def interrupt_later(self, step):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(PerturbedExperts, "run", interrupt_later)
    with pytest.raises(KeyboardInterrupt):
        commit(fragile, measure(fragile, [random_text], CalibrationOptions(samples=2, seq_len=32)).calibration)
    assert calls["n"] == 20
    assert _snapshot(fragile) == before


def test_tampered_calibration_is_rejected(routed, routed_text, tmp_path):
    if not (routed / CALIBRATION_NAME).exists():
        commit(routed, measure(routed, [routed_text], CalibrationOptions(samples=1, seq_len=SEQ)).calibration)
    copy = tmp_path / "b"
    import shutil

    shutil.copytree(routed, copy)
    path = copy / CALIBRATION_NAME
    path.write_text(path.read_text().replace('"gini"', '"gini" ', 1))
    with pytest.raises(ChecksumError):
        read_calibration(copy, read_manifest(copy))
    proc = dymoe("calibrate", copy, "--report-only")
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr


def test_bundle_without_calibration(fragile):
    from dymoe.bundle.calibration import load_calibration

    manifest = read_manifest(fragile)
    if manifest.calibration is None:
        with pytest.raises(BundleError, match="has no calibration"):
            read_calibration(fragile, manifest)
        assert load_calibration(fragile, manifest) is None


def test_runtime_priors(routed, routed_cal):
    from dymoe.bundle.calibration import load_calibration, priors_of, retention_of

    commit(routed, routed_cal)
    cal = load_calibration(routed, read_manifest(routed))
    retention, priors = retention_of(cal), priors_of(cal)
    assert retention == routed_cal.schedule.recommended["int2"] and len(retention) == LAYERS
    assert all(0 < r <= 1 for r in retention)
    assert retention_of(cal, "skip") == routed_cal.schedule.recommended["skip"]
    for layer in range(LAYERS):
        assert sum(priors[(layer, e)] for e in range(E)) == pytest.approx(E, rel=1e-5)  # 1.0 is average
    assert priors[(0, 0)] > priors[(0, 2)] > priors[(0, 4)] == 0.0


# --- bad data through the command line -------------------------------------------------------


@pytest.mark.parametrize("name, content, needle", [
    ("missing.txt", None, "data file not found"),
    ("empty.txt", b"", "is empty"),
    ("latin1.txt", b"w1 w2 caf\xe9", "is not valid UTF-8"),
    ("records.jsonl", b'{"text": "w1 w2"}\n{"content": "w3"}\n', ":2: the JSON record has no 'text' field"),
    ("short.txt", b"w1 w2 w3", "has 3 tokens, fewer than one sample of --seq-len 16 needs"),
])
def test_bad_data_exits_1_and_leaves_bundle_unchanged(fragile, tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    before = _snapshot(fragile)
    proc = dymoe("calibrate", fragile, "--data", path, "--seq-len", SEQ, "--no-report")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and needle in proc.stderr and name in proc.stderr
    assert "hint:" in proc.stderr
    assert _snapshot(fragile) == before


def test_option_errors(fragile, random_text):
    proc = dymoe("calibrate", fragile, "--data", random_text, "--seq-len", 1000, "--no-report")
    assert proc.returncode == 1 and "exceeds the model's context of 64" in proc.stderr
    proc = dymoe("calibrate", fragile, "--no-report")
    assert proc.returncode == 1 and "no calibration data" in proc.stderr
