"""``--device``: asking for a GPU where onnxruntime-gpu or a GPU is missing is a two-line error that
says what to install or check; the CPU path is what it was; device memory limits the budget."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from dymoe.bundle.errors import InputError
from dymoe.runtime import device as device_mod
from dymoe.runtime.device import DeviceError, check_device, failed_start, missing_provider
from dymoe.runtime.device_memory import RUNTIME_RESERVE, device_costs, fit_problem
from dymoe.runtime.execution import execution_target
from dymoe.targets.devices import load_device
from dymoe.targets.providers import CPU, CUDA, TENSORRT, ExecutionTarget


def dymoe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dymoe.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error:") and "\n  hint:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("device, available, needle", [
    ("cpu", [CPU], None),
    ("cuda", [CUDA, CPU], None),
    ("tensorrt", [TENSORRT, CUDA, CPU], None),
    ("cuda", [CPU], "pip install onnxruntime-gpu"),  # the CPU package
    ("tensorrt", [CPU], "pip install onnxruntime-gpu"),
    ("tensorrt", [CUDA, CPU], "--device cuda"),  # a GPU build without TensorRT
])
def test_missing_provider(device, available, needle):
    e = missing_provider(device, available)
    assert (e is None) == (needle is None)
    if e is not None:
        assert needle in e.hint and e.message.startswith(f"--device {device}")


@pytest.mark.parametrize("device, started, loader, needles", [
    ("cuda", [CUDA, CPU], None, None),
    ("cuda", [CPU], "libcublasLt.so.12: cannot open shared object file", ("libcublasLt.so.12", "nvidia-smi")),
    ("tensorrt", [CUDA, CPU], "libnvinfer.so.10: cannot open shared object file", ("libnvinfer", "TensorRT")),
    ("cuda", [CPU], None, ("could not start its CUDA provider", "--device cpu")),
])
def test_failed_start(device, started, loader, needles):
    e = failed_start(device, started, loader)
    assert (e is None) == (needles is None)
    for needle in needles or ():
        assert needle in e.message + e.hint


def test_onnxruntime_gpu_without_a_gpu(monkeypatch):
    """onnxruntime-gpu installed, no GPU: ORT lists the provider, then runs the probe on the CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(device_mod, "_started", lambda device, device_id: (CPU,))
    monkeypatch.setattr(device_mod, "_loader_error", lambda device: "libcudart.so.12: cannot open shared object file")
    with pytest.raises(DeviceError, match="libcudart.so.12") as e:
        check_device(ExecutionTarget("cuda"))
    assert "NVIDIA GPU" in e.value.hint


def test_this_machine_has_no_gpu_provider():
    """What this CI machine really has: the CPU onnxruntime package (no provider, nothing to probe)."""
    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(DeviceError, match="CPU only"):
        execution_target("cuda")
    check_device(ExecutionTarget("cpu"))  # the CPU needs no check


@pytest.fixture(scope="module")
def demo_bundle():
    from dymoe.demo import ensure_demo_bundle

    return ensure_demo_bundle()


@pytest.mark.parametrize("args, needles", [
    (("--device", "cuda"), ("--device cuda", "onnxruntime-gpu")),
    (("--device", "tensorrt", "--target", "orin-nano-8gb"), ("--device tensorrt", "onnxruntime-gpu")),
    (("--device", "gpu"), ("unknown --device", "cpu, cuda, tensorrt")),
    (("--engines", "auto"), ("needs --device tensorrt",)),
    (("--target", "jetson-tx2"), ("unknown device profile", "orin-nano-8gb")),
])
def test_run_asks_for_a_device_it_cannot_have(demo_bundle, args, needles):
    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert_clean_error(dymoe("run", demo_bundle, "-p", "Hello", *args), *needles)


@pytest.mark.parametrize("command", [("eval", "--max-windows", "1"), ("bench", "--no-accuracy")])
def test_eval_and_bench_take_device_too(demo_bundle, command):
    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert_clean_error(dymoe(command[0], demo_bundle, *command[1:], "--device", "cuda"), "onnxruntime-gpu")


def test_the_cpu_path_is_unchanged(demo_bundle):
    """No target, the default target and an explicit --device cpu: the same sessions, the same logits."""
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.model_session import open_model

    b = Bundle(demo_bundle)
    assert b.session(b.manifest.backbone.embed).get_providers() == [CPU]
    logits = []
    for target in (None, ExecutionTarget("cpu"), execution_target("cpu")):
        s = open_model(demo_bundle, precision="int4", target=target)
        try:
            logits.append(s.model.forward(np.arange(8), s.model.new_cache()))
        finally:
            s.close()
    assert np.array_equal(logits[0], logits[1]) and np.array_equal(logits[0], logits[2])


@pytest.mark.parametrize("experts, backbone, kv, fits", [
    (3 * 2**30, 2**30, 2**28, True),
    (4 * 2**30, 2**30, 2**28, False),  # 5.25 GiB + the runtime reserve > 5 GiB usable
    (5 * 2**30 - RUNTIME_RESERVE, 0, 0, True),  # exactly the usable memory
    (5 * 2**30 - RUNTIME_RESERVE + 1, 0, 0, False),
])
def test_what_fits_an_orin_nano(experts, backbone, kv, fits):
    problem = fit_problem(load_device("orin-nano-8gb"), experts, backbone, kv)
    assert (problem is None) == fits
    if problem:
        assert "unified memory" in problem and "5 GiB usable on orin-nano-8gb" in problem


def test_the_budget_must_fit_the_device(demo_bundle, tmp_path):
    """A profile with room for 5 MiB of experts beside the rest: the demo's all-fp32 experts (16 MiB)
    do not fit, a 2 MiB budget does."""
    from dymoe.bundle.manifest import read_manifest
    from dymoe.runtime.device_memory import backbone_bytes, kv_bytes

    m = read_manifest(demo_bundle)
    usable = (RUNTIME_RESERVE + backbone_bytes(m) + kv_bytes(m) + 5 * 2**20) / 2**30
    text = (load_device.__globals__["_folder"]() / "orin-nano-8gb.toml").read_text()
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(text.replace("usable_memory_gib = 5.0", f"usable_memory_gib = {usable!r}"))
    proc = dymoe("run", demo_bundle, "-p", "Hello", "--target", tiny, "--max-new-tokens", "2")
    assert_clean_error(proc, "every expert at fp32 does not fit", "lower --budget")
    proc = dymoe("run", demo_bundle, "-p", "Hello", "--target", tiny, "--policy", "lru", "--budget", "100%",
                 "--max-new-tokens", "2")
    assert_clean_error(proc, "--budget 100%", "does not fit")
    proc = dymoe("run", demo_bundle, "-p", "Hello", "--target", tiny, "--policy", "lru", "--budget", "2MiB",
                 "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr


def test_device_costs_count_weights_as_stored(demo_bundle):
    from dymoe.bundle.manifest import read_manifest

    m = read_manifest(demo_bundle)
    costs = device_costs(m, ExecutionTarget("cuda", load_device("orin-nano-8gb")))
    biggest = {p: max(m.files[e.variants[p].path].bytes for e in m.experts) for p in m.quantization.precisions}
    assert costs["fp16"] - costs["fp32"] > 2 * biggest["fp16"] - biggest["fp32"] - 1  # the folded fp32 copy
    assert costs["int2"] < costs["int4"] < costs["int8"] < costs["fp32"]
    assert all(costs[p] > biggest[p] for p in costs)  # plus activations


def test_execution_target_from_options():
    t = execution_target("cpu", "orin-nx-16gb", check=False)
    assert t.is_cpu and t.profile.name == "orin-nx-16gb" and t.cache_dir is None
    t = execution_target("tensorrt", "orin-nano-8gb", "auto", check=False)
    assert t.engines.name == "orin-nano-8gb" and t.cache_dir.name == "orin-nano-8gb"
    with pytest.raises(InputError, match="needs --target"):
        execution_target("tensorrt", None, "auto", check=False)
