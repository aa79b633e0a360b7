"""Bad input gives a short error naming the file or field and the next step, exit status 1,
and never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dymoe.bundle.manifest import read_manifest
from dymoe.bundle.safetensors_io import write_safetensors
from dymoe.toolchain.synthetic import write_synthetic_checkpoint


def dymoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dymoe.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error:")
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "src"
    write_synthetic_checkpoint(folder, hidden=64, intermediate=64, experts=4, layers=2, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=32)
    return folder


@pytest.fixture()
def src(synth, tmp_path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(synth, copy)
    return copy


@pytest.fixture(scope="module")
def bundle(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    proc = dymoe("export", synth, "--out", out, "--precisions", "fp32,int4")
    assert proc.returncode == 0, proc.stderr
    return out


def test_unknown_architecture(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    proc = dymoe("export", src, "--out", tmp_path / "b")
    assert_clean_error(proc, "llama", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
    assert not (tmp_path / "b").exists()


def test_missing_shard(src, tmp_path):
    (src / "model-layer001.safetensors").unlink()
    assert_clean_error(dymoe("export", src, "--out", tmp_path / "b"), "model-layer001.safetensors")


def test_truncated_safetensors(src, tmp_path):
    shard = src / "model-layer000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assert_clean_error(dymoe("export", src, "--out", tmp_path / "b"), "model-layer000.safetensors", "truncated")


def test_leftover_tensor_is_named(src, tmp_path):
    write_safetensors(src / "extra.safetensors", {"model.layers.0.mystery.weight": __import__("numpy").ones(4)})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mystery.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_error(dymoe("export", src, "--out", tmp_path / "b"), "model.layers.0.mystery.weight")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.json").unlink()
    assert_clean_error(dymoe("export", src, "--out", tmp_path / "b"), "tokenizer.json")


def test_existing_bundle_is_not_overwritten(bundle, synth):
    before = (bundle / "manifest.json").read_bytes()
    assert_clean_error(dymoe("export", synth, "--out", bundle), "already holds a complete bundle", "--force")
    assert (bundle / "manifest.json").read_bytes() == before


def test_corrupted_expert_file(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    rel = read_manifest(copy).expert(1, 2).variants["fp32"].path
    data = bytearray((copy / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (copy / rel).write_bytes(bytes(data))
    assert_clean_error(dymoe("run", copy, "--prompt", "w1 w2", "--max-new-tokens", "2"), "checksum", rel)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["model"].update(favourite_colour="blue"), "model.favourite_colour"),
        (lambda m: m.pop("quantization"), "quantization"),
        (lambda m: m["model"].pop("top_k"), "model.top_k"),
        (lambda m: m["model"].update(num_layers="three"), "model.num_layers"),
    ],
    ids=["unknown-field", "missing-section", "missing-field", "wrong-type"],
)
def test_bad_manifest_field(bundle, tmp_path, edit, needle):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    for cmd in (["info", copy], ["run", copy, "--prompt", "w1"]):
        assert_clean_error(dymoe(*cmd), needle)


def test_prompt_longer_than_context(bundle):
    long_prompt = " ".join(f"w{i % 60}" for i in range(40))  # context is 32 tokens
    assert_clean_error(dymoe("run", bundle, "--prompt", long_prompt), "40 tokens", "context is 32")


def test_unknown_precision(bundle, synth, tmp_path):
    assert_clean_error(dymoe("run", bundle, "--prompt", "w1", "--precision", "int2"), "int2", "fp32, int4")
    assert_clean_error(dymoe("export", synth, "--out", tmp_path / "x", "--precisions", "int3"), "int3")


def test_usage_errors_keep_status_2(bundle):
    proc = dymoe("run", bundle)  # --prompt missing
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_run_writes_metrics_json(bundle, tmp_path):
    path = tmp_path / "m.json"
    proc = dymoe("run", bundle, "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--metrics-json", path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(path.read_text())
    assert m["prompt_ids"] == [1, 2, 3]
    assert len(m["token_ids"]) == m["new_tokens"] == 5
    assert m["ttft_s"] > 0 and m["tpot_s"] > 0 and len(m["token_times_s"]) == 4
    assert "TTFT" in proc.stderr and "TPOT" in proc.stderr
    assert proc.stdout.strip() == m["text"].strip()


def test_a_budget_is_never_ignored(bundle):
    # without --policy a budget used to be dropped unread; it now means the dymoe policy, so a bad one is an error
    assert_clean_error(dymoe("run", bundle, "--prompt", "w1", "--budget", "abc"), "--budget 'abc'")
    assert_clean_error(dymoe("run", bundle, "--prompt", "w1", "--precision", "int4", "--budget", "50%"),
                       "--precision and --budget exclude each other")
    ok = dymoe("run", bundle, "--prompt", "w1", "--budget", "100%", "--max-new-tokens", "2")
    assert ok.returncode == 0, ok.stderr
    assert "budget" in ok.stderr and "hit rate" in ok.stderr  # a budgeted run's summary line


def test_eval_under_a_policy_says_how_many_steps_it_will_take(bundle, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 30}" for i in range(200)))
    proc = dymoe("eval", bundle, "--data", text, "--budget", "abc")
    assert_clean_error(proc, "--budget 'abc'")
    proc = dymoe("eval", bundle, "--data", text, "--policy", "lru", "--window", "16", "--max-windows", "2")
    assert proc.returncode == 0, proc.stderr
    assert "token by token: 30 decode steps" in proc.stderr, proc.stderr
    assert "over 30 tokens" in proc.stdout
