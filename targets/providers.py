"""Where graphs run: the execution target and the ONNX Runtime providers (with their options) each
graph gets. The only module that names a provider; ``runtime/ort_session.py`` is the one session
factory that uses it. Pure: nothing here imports onnxruntime.

* ``cpu``: every graph on ``CPUExecutionProvider`` (what dymoe always did).
* ``cuda``: every graph on ``CUDAExecutionProvider``, CPU behind it for any node CUDA lacks;
  MatMulNBits experts of a bit width the device's onnxruntime-gpu has no CUDA kernel for (2-bit
  on the Orin profiles) on the CPU alone, as ``dymoe check`` reports.
* ``tensorrt``: expert graphs whose format TensorRT runs (``float``, ``float16``,
  ``qdq_sym_int4_fp16``) on ``TensorrtExecutionProvider``, then CUDA, then CPU; every other graph
  (MatMulNBits int8/int2 experts, asymmetric QDQ, and the backbone, whose KV-cache inputs change
  shape every step) on CUDA then CPU.

Option names and value types are ONNX Runtime's (TensorRT provider: ``trt_*``; CUDA provider:
``arena_extend_strategy`` ...); Python booleans and integers, as its Python API documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dymoe.bundle.precisions import BITS

from .devices import DeviceProfile, EngineShapes
from .rules import CUDA_NBITS

DEVICES = ("cpu", "cuda", "tensorrt")
DEVICE = "cpu"  # the default of --device
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDER = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
TENSORRT_FORMATS = ("float", "float16", "qdq_sym_int4_fp16")  # expert formats TensorRT builds (targets/rules.py)
EXPERT_INPUT = "x"  # bundle.graph_io.EXPERT_IN (targets may not import it at run time: kept equal by a test)

Providers = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class ExecutionTarget:
    """What ``--device`` and ``--target`` chose. ``cache_dir`` holds ONNX Runtime's own TensorRT
    engine and timing caches; ``engines`` is a ``dymoe build-engines`` cache to load prebuilt
    engines from (None: ONNX Runtime builds its own on first use)."""

    device: str = DEVICE
    profile: DeviceProfile | None = None
    cache_dir: Path | None = None
    engines: Path | None = None
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def provider(self) -> str:
        return PROVIDER[self.device]

    @property
    def shapes(self) -> EngineShapes:
        return self.profile.engines if self.profile else EngineShapes()

    def label(self) -> str:
        return self.device + (f" ({self.profile.name})" if self.profile else "")


CPU_TARGET = ExecutionTarget()


def cuda_options(target: ExecutionTarget) -> dict[str, Any]:
    """CUDA provider options: dymoe's defaults, then the profile's ``[cuda]`` table.
    ``kSameAsRequested``: many small expert sessions must not each round their arena up to the
    next power of two on a board whose GPU memory is the system's DRAM."""
    opts: dict[str, Any] = {"device_id": target.device_id, "arena_extend_strategy": "kSameAsRequested",
                            "do_copy_in_default_stream": True}
    if target.profile:
        opts.update(target.profile.cuda)
    return opts


def tensorrt_options(target: ExecutionTarget, hidden_size: int) -> dict[str, Any]:
    """TensorRT provider options of an expert graph ``x [T, hidden_size]``: ONNX Runtime's engine
    and timing caches under ``cache_dir`` (built once per graph on the device, reused by every later
    session), one optimisation profile over T (decode's T = 1 up to the prefill chunk), fp16 left
    off because the graphs carry their own types, then the profile's ``[tensorrt]`` table."""
    s = target.shapes
    opts: dict[str, Any] = {
        "device_id": target.device_id,
        "trt_fp16_enable": False,
        "trt_builder_optimization_level": 3,
        "trt_context_memory_sharing_enable": True,
        "trt_profile_min_shapes": f"{EXPERT_INPUT}:{s.min_tokens}x{hidden_size}",
        "trt_profile_opt_shapes": f"{EXPERT_INPUT}:{s.opt_tokens}x{hidden_size}",
        "trt_profile_max_shapes": f"{EXPERT_INPUT}:{s.max_tokens}x{hidden_size}",
    }
    if target.cache_dir is not None:
        opts.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(Path(target.cache_dir) / "engines"),
                     "trt_timing_cache_enable": True, "trt_timing_cache_path": str(Path(target.cache_dir) / "timing")})
    if target.profile:
        opts.update(target.profile.tensorrt)
    return opts


def providers_for(target: ExecutionTarget, expert_format: str | None = None, hidden_size: int = 0,
                  precision: str | None = None) -> Providers:
    """The providers (in order, with options) of one graph: an expert graph of manifest format
    ``expert_format``, width ``hidden_size`` and ``precision``, or the backbone (``expert_format`` None)."""
    if target.is_cpu:
        return [(CPU, {})]
    cuda_bits = target.profile.capabilities.cuda_matmulnbits_bits if target.profile else CUDA_NBITS
    if expert_format == "matmulnbits" and precision in BITS and BITS[precision] not in cuda_bits:
        return [(CPU, {})]
    chain: Providers = [(CUDA, cuda_options(target)), (CPU, {})]
    if target.device == "tensorrt" and expert_format in TENSORRT_FORMATS:
        chain.insert(0, (TENSORRT, tensorrt_options(target, hidden_size)))
    return chain


def session_config(target: ExecutionTarget) -> dict[str, str]:
    """Session config entries a device needs: GPU sessions share one arena registered on the ONNX
    Runtime environment (each expert is its own session; separate arenas would each keep freed
    memory to themselves)."""
    return {} if target.is_cpu else {"session.use_env_allocators": "1"}
