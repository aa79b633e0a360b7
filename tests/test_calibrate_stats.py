"""Calibration's pure parts, table-tested: statistics, retention schedules, data loading and
sampling, and the strict calibration.json reader. No bundles, no ONNX Runtime."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dymoe.bundle.calibration import (
    BundleRef,
    Calibration,
    DataSource,
    ExpertImportance,
    LayerImportance,
    Prediction,
    Settings,
    Skew,
    parse,
    round_sig,
)
from dymoe.bundle.errors import BundleError, InputError
from dymoe.calibration import schedule as sched
from dymoe.calibration import stats
from dymoe.calibration.data import discover, load, sample_windows, tokenize
from dymoe.runtime.maths import log_softmax
from dymoe.runtime.policy import heavy_hitters


@pytest.mark.parametrize("values, expected", [
    ([1, 1, 1, 1], 0.0),
    ([0, 0, 0, 5], 0.75),  # one of n holds everything: (n - 1) / n
    ([1, 2, 3, 4], 0.25),  # sum |xi - xj| = 20 over 2 n^2 mean = 80
    ([0, 0, 0, 0], 0.0),
    ([7], 0.0),
])
def test_gini(values, expected):
    assert stats.gini(values) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("values, expected", [
    ([1, 1, 1, 1], 1.0),
    ([0, 0, 3, 0], 0.0),
    ([1, 1, 0, 0], 0.5),  # log 2 / log 4
    ([5], 1.0),
    ([0, 0], 1.0),
])
def test_normalized_entropy(values, expected):
    assert stats.normalized_entropy(values) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("values, fraction, expected", [
    ([1] * 10, 0.2, 0.2),  # top 2 of 10
    ([5, 1, 1, 1, 1, 1, 0, 0, 0, 0], 0.2, 0.6),
    ([1] * 16, 0.2, 4 / 16),  # ceil(3.2) = 4 experts
    ([3, 1], 0.2, 0.75),  # at least one
    ([0, 0, 0], 0.2, 0.0),
])
def test_top_share(values, fraction, expected):
    assert stats.top_share(values, fraction) == pytest.approx(expected)


@pytest.mark.parametrize("values, mass, expected", [
    ([1] * 10, 0.8, 8),
    ([8, 1, 1], 0.8, 1),
    ([7, 2, 1], 0.8, 2),
    ([4, 4, 1, 1], 0.8, 2),  # exactly 80 %
    ([0, 0], 0.8, 0),
])
def test_coverage_count(values, mass, expected):
    assert stats.coverage_count(values, mass) == expected


def test_bad_importance_vectors():
    for bad in ([], [1, -1], [np.nan]):
        with pytest.raises(ValueError):
            stats.gini(bad)


@pytest.mark.parametrize("colsum, tokens, fraction, expected", [
    ([5, 4, 3, 2, 1, 0, 0, 0, 0, 0], 10, 0.1, [0]),
    ([0, 1, 9, 2, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 16, 0.1, [2, 4]),  # ceil(1.6) = 2
    ([3, 3, 3, 3], 4, 0.5, [0, 1]),  # ties to the earlier token
    ([9, 9, 1, 2, 3], 3, 0.2, [2]),  # only the last `tokens` positions are new
])
def test_heavy_hitters(colsum, tokens, fraction, expected):
    assert heavy_hitters(np.array(colsum, dtype=np.float32), tokens, fraction).tolist() == expected


def test_recall_at_k():
    actual = np.array([[0, 1], [2, 3], [4, 5]])
    assert stats.recall_at_k(actual, actual) == 1.0
    assert stats.recall_at_k(np.array([[1, 7], [3, 2], [6, 7]]), actual) == pytest.approx(3 / 6)
    assert stats.recall_at_k(np.array([[1, 0, 9, 9], [9, 9, 9, 9], [5, 9, 9, 4]]), actual) == pytest.approx(4 / 6)
    assert stats.topk_experts(np.array([[0.0, 2.0, 2.0, 1.0]]), 2).tolist() == [[1, 2]]  # ties: lower index


def test_kl_and_nll():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    ref = log_softmax(logits)
    assert stats.kl_rows(ref, logits) == pytest.approx([0.0, 0.0], abs=1e-12)
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # KL([.5 .25 .25] || [.25 .5 .25])
    assert stats.kl_rows(ref, q) == pytest.approx([expected, 0.0])
    # teacher forcing: row i scores ids[i + 1]; the last row predicts nothing
    three = np.vstack([logits, np.zeros((1, 3))])
    assert stats.nll_rows(three, np.array([9, 2, 0])) == pytest.approx([-math.log(0.25), -math.log(0.1)])


@pytest.mark.parametrize("x, expected", [(0.123456789, 0.123457), (-1234567.0, -1234570.0), (0.0, 0.0),
                                         (-0.0, 0.0), (1e-12 / 3, 3.33333e-13)])
def test_round_sig(x, expected):
    assert round_sig(x, 6) == expected
    assert math.copysign(1, round_sig(x, 6)) == math.copysign(1, expected)


# --- schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("r, k, kept", [
    (0.0, 2, 0), (0.2, 2, 1), (0.5, 2, 1), (0.75, 2, 1), (0.99, 2, 1), (1.0, 2, 2),
    (0.5, 8, 4), (0.9, 8, 7), (0.1, 8, 1), (0.3, 1, 1), (1 / 3, 3, 1), (2 / 3, 3, 2),
])
def test_kept_per_token_rounds_down_keeping_one(r, k, kept):
    assert sched.kept_per_token(r, k) == kept


def test_rounding_agrees_with_the_runtime():
    policy = pytest.importorskip("dymoe.runtime.policy")
    for k in (1, 2, 4, 8):
        for r in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            critical = sum(policy.tier_of(rank, k, r, 2) == 0 for rank in range(k))
            assert critical == sched.kept_per_token(r, k), (r, k)


def test_retention_grid():
    assert sched.retention_grid((0.25, 0.5, 0.75), 2) == [0.5]
    assert sched.retention_grid((0.25, 0.5, 0.75), 8) == [0.125, 0.25, 0.5, 0.75]
    assert sched.retention_grid((0.25, 0.5, 0.75), 1) == []  # nothing between keeping none and all
    assert sched.retention_grid((), 4) == [0.25]


def test_cosine_schedule():
    rs = sched.cosine_schedule(5, 1.0, 0.5)
    assert rs[0] == pytest.approx(1.0) and rs[-1] == pytest.approx(0.5) and rs[2] == pytest.approx(0.75)
    assert rs == sorted(rs, reverse=True)
    assert sched.cosine_schedule(1, 0.9, 0.1) == [0.9]


def test_recommend_and_predicted_loss():
    losses = [{0.0: 0.30, 0.5: 0.02}, {0.0: 0.004, 0.5: 0.001}, {0.0: 0.5, 0.5: 0.2}]
    # budget 0.03 / 3 layers = 0.01 each: layer 0 at 0.5 loses 0.02, too much: 1.0; layer 1 fits at 0.5
    # (retention 0 fits too, but the runtime always keeps one expert, so 0 is never recommended)
    assert sched.recommend(losses, 0.03) == [1.0, 0.5, 1.0]
    assert sched.recommend(losses, 0.09) == [0.5, 0.5, 1.0]
    assert sched.predicted_loss(losses, [1.0, 0.5, 1.0], 2) == pytest.approx(0.001)
    assert sched.predicted_loss(losses, [0.5, 0.9, 0.25], 2) == pytest.approx(0.02 + 0.001 + 0.2)  # r < 1 keeps 1
    assert sched.loss_at({0.0: 0.4, 0.5: 0.2}, 0.75) == pytest.approx(0.1)  # linear towards loss(1) = 0
    with pytest.raises(ValueError):
        sched.recommend([{0.5: 0.1}], 1.0)  # retention 0 must be measured


# --- data -------------------------------------------------------------------------------------

def test_folder_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second file")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "d" / "sub" / "c.md").write_text("third")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\xff")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    names = [name for _, name in discover([tmp_path / "d"])]
    assert [n.rsplit("/", 2)[-2:] for n in names] == [["d", "a.jsonl"], ["d", "b.txt"], ["sub", "c.md"]]
    files = load([tmp_path / "d"])
    assert [f.documents for f in files] == [["one", "two"], ["second file"], ["third"]]
    ids = tokenize(files, lambda text: [len(w) for w in text.split()], eos=0)
    assert ids.tolist() == [3, 0, 3, 0, 6, 4, 0, 5, 0]
    assert tokenize(files, lambda text: [len(text), 0], eos=0).tolist() == [3, 0, 3, 0, 11, 0, 5, 0]  # no double eos


@pytest.mark.parametrize("name, content, needle", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\t\n", "is empty"),
    ("latin1.txt", b"caf\xe9 au lait", "not valid UTF-8 (byte 3, line 1)"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "notext.jsonl:2: the JSON record has no 'text' field"),
    ("number.jsonl", b'{"text": 5}\n', "field 'text' is a int"),
    ("broken.jsonl", b'{"text": "a"\n', "broken.jsonl:1: not valid JSON"),
    ("empty.jsonl", b'{"text": ""}\n\n', "is empty"),
])
def test_bad_data_files(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as e:
        load([tmp_path / name])
    assert needle in e.value.message and e.value.hint


def test_missing_data(tmp_path):
    with pytest.raises(InputError, match="data file not found"):
        load([tmp_path / "nope.txt"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="holds no .txt"):
        load([tmp_path / "empty_dir"])
    with pytest.raises(InputError, match="no calibration data"):
        load([])


def test_sampling_is_deterministic_and_non_overlapping():
    ids = np.arange(1000)
    a = sample_windows(ids, 5, 64, seed=3)
    b = sample_windows(ids, 5, 64, seed=3)
    c = sample_windows(ids, 5, 64, seed=4)
    assert a.available == 15 and a.tokens == 1000
    starts = [int(w[0]) for w in a.windows]
    assert starts == [int(w[0]) for w in b.windows] != [int(w[0]) for w in c.windows]
    assert starts == sorted(starts) and all(s % 64 == 0 for s in starts) and len(set(starts)) == 5
    assert sorted(a.draw_order) == list(range(5)) and a.subset(2) == sorted(a.draw_order[:2])
    assert a.subset(100) == list(range(5))
    firsts = {tuple(sample_windows(ids, 15, 64, seed=s).subset(3)) for s in range(8)}
    assert len(firsts) > 1  # the subset is drawn at random, not always the first windows
    assert all(len(w) == 64 and (np.diff(w) == 1).all() for w in a.windows)
    assert len(sample_windows(ids, 100, 64, seed=0).windows) == 15  # fewer than asked: all of them
    with pytest.raises(InputError, match="fewer than one sample"):
        sample_windows(ids[:63], 1, 64, seed=0, names=["x.txt"])


# --- schema -----------------------------------------------------------------------------------

def _tiny_calibration() -> Calibration:
    settings = Settings(samples=1, sensitivity_samples=0, seq_len=4, seed=0,
                        data=[DataSource("a.txt", 3, "0" * 64, 1)], data_tokens=4,
                        windows_available=1, reference_precision="fp32", modes=[], heavy_hitter_fraction=0.1,
                        critical_fraction=0.5, retentions=[0.5], top_share_fraction=0.2, coverage_mass=0.8,
                        percentiles=[10.0, 50.0, 90.0], recall_ks=[1], target_kl=0.05, cosine_r_max=1.0,
                        cosine_r_min=0.5)
    experts = [ExpertImportance(e, 2, 0.5, 1.0 / 3, 0.5, 1.0 / 3, [0.1, 0.2, 0.3], 1, 0.25) for e in range(2)]
    layer = LayerImportance(0, 4, 1, Skew(0.0, 1.0, 0.5, 2), experts)
    return Calibration(1, "0.1.0", BundleRef("f" * 64, "mixtral", 1, 2, 1), settings, [layer], None,
                       [Prediction(1, 1, "router_input", 1, 2 / 3)], None)


def test_schema_round_trip_is_byte_stable():
    text = _tiny_calibration().to_json()
    data = json.loads(text)
    assert data["importance"][0]["experts"][0]["gate_mass"] == 0.333333  # 6 significant digits
    assert list(data) == sorted(data)  # keys sorted
    again = parse(text)
    assert again.to_json() == text
    assert again.prediction[0].recall == 0.666667


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["settings"].pop("seed"), "missing field 'settings.seed'"),
    (lambda d: d["importance"][0]["skew"].update(gini="high"), "'importance[0].skew.gini' must be a number"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
])
def test_strict_reader(mutate, needle):
    data = json.loads(_tiny_calibration().to_json())
    mutate(data)
    with pytest.raises(BundleError) as e:
        parse(json.dumps(data), "b/calibration.json")
    assert needle in e.value.message and "b/calibration.json" in e.value.message
    assert "manifest.json" not in e.value.message


def test_statistics_need_neither_matplotlib_nor_torch():
    import subprocess
    import sys

    code = ("import sys, dymoe.calibration.run, dymoe.calibration.report; "
            "bad = {'matplotlib', 'torch', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
