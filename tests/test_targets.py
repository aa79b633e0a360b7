"""Device profiles and provider placement: the shipped Jetson profiles, strict reading, provider
options named and typed as ONNX Runtime documents them, which providers each graph gets, and
that no other file names a provider."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dymoe.bundle import graph_io
from dymoe.bundle.errors import InputError
from dymoe.bundle.precisions import KNOWN_FORMATS
from dymoe.targets.devices import available_devices, load_device
from dymoe.targets.providers import (
    CPU,
    CUDA,
    EXPERT_INPUT,
    TENSORRT,
    ExecutionTarget,
    cuda_options,
    providers_for,
    session_config,
    tensorrt_options,
)

ROOT = Path(__file__).resolve().parents[1]

# ONNX Runtime's TensorRT provider option names (tensorrt_execution_provider_info.cc) and the
# CUDA provider's (CUDA-ExecutionProvider docs): every option dymoe sets must be one of them
TRT_DOCUMENTED = {
    "device_id", "has_user_compute_stream", "user_compute_stream", "trt_max_partition_iterations",
    "trt_min_subgraph_size", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable", "trt_dla_enable",
    "trt_dla_core", "trt_dump_subgraphs", "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes",
    "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path", "trt_ep_context_embed_mode",
    "trt_engine_hw_compatible", "trt_weight_stripped_engine_enable", "trt_onnx_model_folder_path",
}
CUDA_DOCUMENTED = {
    "device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search", "do_copy_in_default_stream",
    "cudnn_conv_use_max_workspace", "enable_cuda_graph", "use_tf32", "prefer_nhwc", "has_user_compute_stream",
    "user_compute_stream", "tunable_op_enable", "use_ep_level_unified_stream",
}
BOOL = {"trt_fp16_enable", "trt_engine_cache_enable", "trt_timing_cache_enable", "trt_context_memory_sharing_enable",
        "trt_cuda_graph_enable", "do_copy_in_default_stream", "enable_cuda_graph"}


@pytest.mark.parametrize("name, jetpack, cuda, tensorrt, python, memory, usable", [
    ("orin-nano-8gb", "6.2", "12.6", "10.3", "3.10", 8.0, 5.0),
    ("orin-nx-16gb", "6.2", "12.6", "10.3", "3.10", 16.0, 12.0),
    ("agx-orin-64gb", "7.2", "13.0", "10.16", "3.12", 64.0, 56.0),
])
def test_shipped_profiles(name, jetpack, cuda, tensorrt, python, memory, usable):
    p = load_device(name)
    s = p.software
    assert (s.jetpack, s.cuda, s.tensorrt, s.python) == (jetpack, cuda, tensorrt, python)
    assert (p.memory_gib, p.usable_memory_gib) == (memory, usable)
    assert p.unified_memory and p.compute_capability == "8.7" and p.sm == "87"
    assert p.storage.read_mb_per_s == 1300.0  # the measured Orin Nano NVMe rate
    assert set(p.tensorrt) <= TRT_DOCUMENTED and set(p.cuda) <= CUDA_DOCUMENTED
    assert 2 not in p.capabilities.cuda_matmulnbits_bits
    assert name in available_devices()


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('name = "orin-nano-8gb"', 'name = "x"\ncolour = "green"'), "colour"),
    (lambda t: t.replace("usable_memory_gib = 5.0", "usable_memory_gib = 9.0"), "usable_memory_gib"),
    (lambda t: t.replace("max_tokens = 256", "max_tokens = 0"), "max_tokens"),
    (lambda t: t.replace('compute_capability = "8.7"', 'compute_capability = "sm87"'), "compute_capability"),
    (lambda t: t.replace("[4, 8]", "[3]"), "cuda_matmulnbits_bits"),
    (lambda t: t.replace("memory_gib = 8.0", "memory_gib = 'eight'"), "memory_gib"),
])
def test_a_bad_profile_is_a_clean_error(tmp_path, edit, needle):
    text = (ROOT / "targets" / "device_profiles" / "orin-nano-8gb.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(edit(text))
    with pytest.raises(InputError, match=needle):
        load_device(str(path))


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(InputError, match="orin-nano-8gb"):
        load_device("jetson-tx2")


@pytest.mark.parametrize("device, fmt, want", [
    ("cpu", None, [CPU]),
    ("cpu", "qdq_sym_int4_fp16", [CPU]),
    ("cuda", None, [CUDA, CPU]),
    ("cuda", "qdq_sym_int4_fp16", [CUDA, CPU]),
    ("tensorrt", None, [CUDA, CPU]),  # the backbone: KV-cache shapes change every step
    ("tensorrt", "float", [TENSORRT, CUDA, CPU]),
    ("tensorrt", "float16", [TENSORRT, CUDA, CPU]),
    ("tensorrt", "qdq_sym_int4_fp16", [TENSORRT, CUDA, CPU]),
    ("tensorrt", "qdq", [CUDA, CPU]),  # asymmetric UINT4 / 8-bit: TensorRT cannot
    ("tensorrt", "matmulnbits", [CUDA, CPU]),  # a contrib op: CUDA's MatMulNBits (int8)
])
def test_which_providers_each_graph_gets(device, fmt, want):
    assert fmt is None or fmt in KNOWN_FORMATS
    assert [name for name, _ in providers_for(ExecutionTarget(device), fmt, 64, "int8")] == want


@pytest.mark.parametrize("profile, precision, want", [
    (None, "int2", [CPU]),  # no 2-bit CUDA kernel in current onnxruntime-gpu releases
    ("orin-nano-8gb", "int2", [CPU]),
    ("orin-nano-8gb", "int8", [CUDA, CPU]),
    ("orin-nano-8gb", "int4", [CUDA, CPU]),
])
def test_matmulnbits_without_a_cuda_kernel_runs_on_the_cpu(profile, precision, want):
    target = ExecutionTarget("cuda", load_device(profile) if profile else None)
    assert [name for name, _ in providers_for(target, "matmulnbits", 64, precision)] == want


def test_tensorrt_options_as_documented(tmp_path):
    target = ExecutionTarget("tensorrt", load_device("orin-nano-8gb"), cache_dir=tmp_path)
    opts = tensorrt_options(target, 2048)
    assert set(opts) <= TRT_DOCUMENTED
    assert opts["trt_profile_min_shapes"] == "x:1x2048"
    assert opts["trt_profile_opt_shapes"] == "x:1x2048"
    assert opts["trt_profile_max_shapes"] == "x:256x2048"
    assert opts["trt_engine_cache_enable"] is True and opts["trt_timing_cache_enable"] is True
    assert Path(opts["trt_engine_cache_path"]).parent == tmp_path
    assert Path(opts["trt_timing_cache_path"]).parent == tmp_path
    assert opts["trt_fp16_enable"] is False  # the graphs carry their own types
    assert opts["trt_max_workspace_size"] == 512 * 2**20  # the profile's [tensorrt] table wins
    for k, v in opts.items():
        assert isinstance(v, bool) == (k in BOOL), k
        assert isinstance(v, (bool, int, str)), k
    # the profile shape string is "name:dim x dim" for the expert graphs' one input
    assert re.fullmatch(rf"{EXPERT_INPUT}:\d+x\d+", opts["trt_profile_max_shapes"])


def test_cuda_options_as_documented():
    opts = cuda_options(ExecutionTarget("cuda", load_device("agx-orin-64gb"), device_id=1))
    assert set(opts) <= CUDA_DOCUMENTED
    assert opts["device_id"] == 1 and opts["arena_extend_strategy"] == "kSameAsRequested"
    assert session_config(ExecutionTarget("cuda")) == {"session.use_env_allocators": "1"}
    assert session_config(ExecutionTarget("cpu")) == {}


def test_expert_input_name_is_the_contracts():
    assert EXPERT_INPUT == graph_io.EXPERT_IN


def test_no_other_file_names_a_provider():
    """One session factory takes the target; only targets/providers.py spells a provider's name."""
    found = []
    for folder in ("bundle", "toolchain", "runtime", "targets", "calibration", "dymoe"):
        for path in (ROOT / folder).rglob("*.py"):
            if "ExecutionProvider" in path.read_text():
                found.append(str(path.relative_to(ROOT)))
    assert found == ["targets/providers.py"]


def test_unknown_device_is_refused():
    with pytest.raises(ValueError):
        ExecutionTarget("gpu")
