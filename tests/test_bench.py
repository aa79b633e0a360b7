"""dymoe bench and dymoe eval: the JSON has every metric per policy, ratios come from the raw
numbers, and bad policies or budgets fail before any run."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from dymoe.bundle.errors import InputError
from dymoe.runtime import bench as bench_mod
from dymoe.runtime.bench import BenchOptions, read_prompts, run_bench
from dymoe.runtime.policy_config import PolicyRun

METRICS = ("ttft_s", "tpot_s", "stall_per_token_s", "bytes_read_per_token", "hit_rate", "prefetch_recall",
           "peak_rss_bytes", "perplexity", "top1_agreement")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    rng = np.random.default_rng(0)
    words = ["mixture", "experts", "route", "tokens", "memory", "edge", "device", "layer", "quantization"]
    path.write_text(" ".join(rng.choice(words, 400)))
    return path


def test_bench_json_has_every_metric_and_raw_ratios(tiny_qwen3, heldout, tmp_path):
    out = tmp_path / "bench.json"
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "bench", str(tiny_qwen3.bundle), "--policies",
                           "ondemand,lru,dymoe", "--sweep-budget", "40%,100%", "--repeats", "2", "--new-tokens", "4",
                           "--prompt-tokens", "8", "--data", str(heldout), "--window", "32", "--windows", "2",
                           "--json", str(out), "--plot", str(plots)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [e["budget"] for e in result["results"]] == ["40%", "100%"]
    for entry in result["results"]:
        assert list(entry["policies"]) == ["ondemand", "lru", "dymoe"]
        for name, r in entry["policies"].items():
            for key in METRICS:
                assert key in r, (name, key)
            assert len(r["runs"]) == 2 * len(result["options"]["prompt_tokens"])
            assert r["perplexity"] > 1 and 0 <= r["top1_agreement"] <= 1
        pol = entry["policies"]
        for r in pol.values():
            for base in ("ondemand", "lru"):
                for k in ("ttft_s", "tpot_s"):
                    want = statistics.median(x[k] for x in pol[base]["runs"]) / \
                        statistics.median(x[k] for x in r["runs"])
                    assert r[f"{k}_speedup_vs_{base}"] == pytest.approx(want)
        # at full precision and full budget the baselines compute exactly the reference
        assert pol["lru"]["top1_agreement"] == 1.0
        # the same session's next prompt, with the cache as the first one left it
        assert list(entry["warm"]) == list(entry["policies"])
        for name, r in entry["warm"].items():
            assert len(r["runs"]) == len(entry["policies"][name]["runs"]) and r["tpot_s"] > 0
        assert entry["warm"]["lru"]["hit_rate"] >= entry["policies"]["lru"]["hit_rate"] or entry["budget"] != "100%"
    assert result["reference"]["precision"] == "fp32"
    assert {p.name for p in plots.iterdir()} == {"front.png", "tpot_vs_perplexity.png", "ttft.png",
                                                 "precision_mix.png"}
    # the tables: cold and warm per budget, speed-ups over each baseline (headers may wrap)
    flat = " ".join(proc.stdout.split())  # titles wrap at the terminal's width
    assert flat.count("warm cache (the next prompt in the same session): speed") == 2
    assert "x columns: speed-up over that baseline" in flat


@pytest.mark.parametrize("policies, budgets, needle", [
    (["lru", "fastest"], ["50%"], "unknown policy 'fastest'"),
    (["lru", "dymoe"], ["50%", "1KiB"], "minimum working set"),
    (["lru"], ["lots"], "is not a size"),
])
def test_bad_policy_or_budget_fails_before_any_run(tiny_qwen3, monkeypatch, policies, budgets, needle):
    monkeypatch.setattr(bench_mod, "speed_runs", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(InputError, match=needle):
        run_bench(tiny_qwen3.bundle, BenchOptions(policies, budgets, accuracy=False))


def test_cli_bad_policy_is_a_clean_error(tiny_qwen3):
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "bench", str(tiny_qwen3.bundle), "--policies",
                           "lru,warp", "--no-accuracy"], capture_output=True, text=True)
    assert proc.returncode == 1 and "unknown policy 'warp'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, want", [
    ("one\n\ntwo\n", ["one", "two"]),
    ('{"prompt": "a b"}\n{"text": "c"}\n', ["a b", "c"]),
])
def test_read_prompts(tmp_path, content, want):
    f = tmp_path / "p.txt"
    f.write_text(content)
    assert read_prompts(f) == want


def test_read_prompts_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(InputError, match="p.jsonl:2"):
        read_prompts(f)
    with pytest.raises(InputError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_eval_policy_and_precision(tiny_qwen3, heldout, tmp_path):
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "eval", str(tiny_qwen3.bundle), "--data", str(heldout),
                           "--precision", "int4", "--window", "32", "--max-windows", "3", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["tokens"] == 3 * 31 and r["windows"] == 3
    assert r["reference_perplexity"] > 1 and 0.3 < r["top1_agreement"] < 1.0
    same = subprocess.run([sys.executable, "-m", "dymoe.cli", "eval", str(tiny_qwen3.bundle), "--data", str(heldout),
                           "--policy", "lru", "--budget", "50%", "--window", "32", "--max-windows", "2"],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stderr
    assert "top-1 agreement 1.000" in same.stdout  # fp32 under a budget computes exactly fp32


def test_bench_options_defaults_are_runnable(tiny_qwen3):
    bench_mod.check(bench_mod.Bundle(tiny_qwen3.bundle), BenchOptions(["lru", "dymoe"], ["25%"],
                                                                      base=PolicyRun("lru")))
