"""The budgeted runtime end to end: exactness at full budget, budget errors, faults, metrics,
and a loader test that proves prefetch overlaps loading with compute."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dymoe.bundle.errors import ChecksumError, InputError
from dymoe.bundle.manifest import read_manifest
from dymoe.runtime import loader as loader_mod
from dymoe.runtime.model_session import open_model
from dymoe.runtime.policy_config import PolicyRun
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, 320, 12)]


def generate(bundle, policy: PolicyRun | None = None, precision=None, n=12):
    s = open_model(bundle, precision=precision, policy=policy)
    try:
        result = s.generate_ids(PROMPT, max_new_tokens=n)
        return result.token_ids, s.metrics(result)
    finally:
        s.close()


@pytest.mark.parametrize("policy", ["ondemand", "lru", "lru-prefetch", "dymoe"])
def test_full_precision_policies_match_static_fp32(tiny_qwen3, policy):
    static, _ = generate(tiny_qwen3.bundle, precision="fp32")
    overrides = {"ladder": "fp32"} if policy == "dymoe" else {}
    tokens, m = generate(tiny_qwen3.bundle, PolicyRun(policy, "100%", overrides=overrides))
    assert tokens == static
    assert m["precision_mix"] and all(set(mix) == {"fp32"} for mix in m["precision_mix"].values())


def test_small_budget_evicts_but_stays_exact(tiny_qwen3):
    static, _ = generate(tiny_qwen3.bundle, precision="fp32")
    tokens, m = generate(tiny_qwen3.bundle, PolicyRun("lru", "50%"))
    assert tokens == static
    assert m["peak_resident_bytes"] <= m["budget_bytes"]
    assert 0 < m["hit_rate"] < 1 and m["misses"] > 0


def test_dymoe_uses_the_ladder_and_reports_metrics(tiny_qwen3):
    _, m = generate(tiny_qwen3.bundle, PolicyRun("dymoe", "50%", overrides={"ladder": "int4/int2"}))
    mixes = [set(mix) for mix in m["precision_mix"].values()]
    assert set().union(*mixes) == {"int4", "int2"}
    for key in ("ttft_s", "tpot_s", "tpot_p50_s", "tpot_p90_s", "stall_per_token_s", "bytes_read_per_token",
                "hit_rate", "prefetch_precision", "prefetch_recall", "peak_rss_bytes", "peak_resident_bytes",
                "load_read_s", "load_create_s"):
        assert m[key] is not None, key
    assert m["retention_by_layer"][0] > m["retention_by_layer"][-1]  # cosine schedule


def test_budget_below_working_set_fails_before_loading(tiny_qwen3, monkeypatch):
    loads = []
    monkeypatch.setattr(loader_mod.Loader, "load", lambda self, *a: loads.append(a))
    with pytest.raises(InputError, match="minimum working set"):
        open_model(tiny_qwen3.bundle, policy=PolicyRun("lru", "1KiB"))
    assert loads == []


def _corrupt_all(bundle: Path, precision: str, layer: int = 0) -> None:
    m = read_manifest(bundle)
    for e in range(m.model.num_experts):
        path = bundle / m.expert(layer, e).variants[precision].path
        data = bytearray(path.read_bytes())
        data[-20] ^= 0x55
        path.write_bytes(bytes(data))


def test_corrupted_expert_while_running(tiny_qwen3, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_qwen3.bundle, bundle)
    _corrupt_all(bundle, "int4")
    with pytest.raises(ChecksumError, match="expert_0"):
        generate(bundle, PolicyRun("static-int4", "100%"))
    heard = []
    tokens, m = generate(bundle, PolicyRun("static-int4", "100%", overrides={"on_load_error": "fallback"},
                                           on_note=heard.append))
    assert len(tokens) == 12 and m["load_errors"] > 0
    assert heard and all("failed to load" in n for n in heard) and m["notes"] == heard


def _predictable_model(folder: Path) -> Path:
    """A synthetic model whose routers are identical across layers and whose layers barely
    change the residual stream, so layer l's state predicts layer l+1's routing."""
    write_synthetic_checkpoint(folder, hidden=64, intermediate=128, experts=8, layers=4, heads=4, kv_heads=2,
                               vocab=128, max_position_embeddings=64)
    router = None
    for shard in sorted(folder.glob("model-layer*.safetensors")):
        t = load_file(shard)
        for name in t:
            if name.endswith("block_sparse_moe.gate.weight"):
                router = t[name] * 50 if router is None else router
                t[name] = router
            elif name.endswith(("o_proj.weight", "w2.weight")):
                t[name] = t[name] * 0.01
        save_file(t, shard)
    return folder


class _HeavyExpert:
    """An expert session whose compute takes ``seconds`` (sleeping releases the GIL like ORT does),
    so that there is compute for loads to hide behind."""

    def __init__(self, session, seconds: float) -> None:
        self.session, self.seconds = session, seconds

    def run(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.session.run(*args, **kwargs)


def test_prefetch_overlaps_loading(tmp_path, monkeypatch):
    src = _predictable_model(tmp_path / "src")
    bundle = tmp_path / "b"
    export(str(src), bundle, ExportOptions(precisions=("fp32",)))
    real = loader_mod.create_session
    monkeypatch.setattr(loader_mod, "create_session", lambda *a, **k: _HeavyExpert(real(*a, **k), 0.04))
    slow = tmp_path / "slow.toml"  # a load takes less time than a layer's experts compute
    slow.write_text('name = "slow"\nread_mb_per_s = 20.0\nlatency_ms = 15.0\n')
    runs = {}
    for policy in ("lru", "lru-prefetch"):
        run = PolicyRun(policy, "50%", storage_profile=str(slow))  # room for loads in flight
        s = open_model(bundle, policy=run)
        try:
            r = s.generate_ids([int(t) for t in np.arange(1, 9)], max_new_tokens=10)
            runs[policy] = s.metrics(r)
        finally:
            s.close()
    assert runs["lru-prefetch"]["prefetch_recall"] > 0.8
    assert runs["lru"]["emulated_storage"] and runs["lru-prefetch"]["load_read_s"] > 0
    assert runs["lru-prefetch"]["prefetch_used"] > 0.8 * runs["lru-prefetch"]["prefetch_issued"]
    assert runs["lru-prefetch"]["stall_per_token_s"] < 0.7 * runs["lru"]["stall_per_token_s"], {
        p: (r["stall_per_token_s"], r["hit_rate"], r["prefetch_used"], r["loads"]) for p, r in runs.items()}


def test_ctrl_c_during_generation_exits_cleanly(tmp_path, tiny_qwen3):
    slow = tmp_path / "slow.toml"
    slow.write_text('name = "slow"\nread_mb_per_s = 1.0\nlatency_ms = 50.0\n')
    metrics = tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, "-m", "dymoe.cli", "run", str(tiny_qwen3.bundle), "-p", "hello there",
                             "--policy", "lru-prefetch", "--budget", "30%", "--storage-profile", str(slow),
                             "--max-new-tokens", "100", "--metrics-json", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # no hung loader threads
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert not metrics.exists()


def test_cli_policy_run_and_errors(tiny_qwen3, tmp_path):
    out = tmp_path / "m.json"
    ok = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", str(tiny_qwen3.bundle), "-p", "hello",
                         "--policy", "dymoe", "--budget", "40%", "--io", "direct", "--storage-profile",
                         "orin-nano-nvme", "--max-new-tokens", "4", "--metrics-json", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    m = json.loads(out.read_text())
    assert m["policy"] == "dymoe" and "emulated orin-nano-nvme" in m["storage"] and m["new_tokens"] == 4
    assert "stall/token" in ok.stderr and "emulated" in ok.stderr
    for args, needle in [(["--budget", "1KiB", "--policy", "lru"], "minimum working set"),
                         (["--policy", "fastest"], "unknown policy"),
                         (["--policy", "lru", "--precision", "fp32"], "exclude each other"),
                         (["--storage-profile", "floppy", "--policy", "lru"], "unknown storage profile")]:
        bad = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", str(tiny_qwen3.bundle), "-p", "hi", *args],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_engine_cache_reuses_optimised_graphs(tiny_qwen3, tmp_path):
    plain, _ = generate(tiny_qwen3.bundle, precision="int4")
    first_tokens, first = generate(tiny_qwen3.bundle, PolicyRun("static-int4", "100%", engine_cache=str(tmp_path)))
    cached = sorted(tmp_path.glob("*.onnx"))
    assert len(cached) == first["loads"] > 0  # one optimised graph per distinct int4 expert used
    again_tokens, again = generate(tiny_qwen3.bundle, PolicyRun("static-int4", "100%", engine_cache=str(tmp_path)))
    assert again_tokens == first_tokens == plain
    assert sorted(tmp_path.glob("*.onnx")) == cached
    # a damaged entry is detected by its own checksum and rebuilt from the bundle
    cached[0].write_bytes(b"junk")
    third_tokens, _ = generate(tiny_qwen3.bundle, PolicyRun("static-int4", "100%", engine_cache=str(tmp_path)))
    assert third_tokens == plain and len(list(tmp_path.glob("*.onnx"))) == len(cached)


def test_engine_cache_does_not_hide_a_damaged_bundle_file(tiny_qwen3, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_qwen3.bundle, bundle)
    run = PolicyRun("static-int4", "100%", engine_cache=str(tmp_path / "engines"))
    generate(bundle, run)  # builds and caches every engine it used, from verified files
    _corrupt_all(bundle, "int4")  # same paths, same sizes, new bytes
    with pytest.raises(ChecksumError):
        generate(bundle, run)
