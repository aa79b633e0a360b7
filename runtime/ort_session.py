"""The one ONNX Runtime session factory: session settings that suit small devices, and the
providers of the execution target (``targets/providers.py`` decides which, per graph).

Many expert sessions, each with ORT's default thread pool, spin and fight over two cores; so
expert sessions run single-threaded without spinning, and only the backbone gets a small pool.
On a GPU target (``--device cuda|tensorrt``) the device is checked once per process first
(``runtime/device.py``), sessions share one arena, and a session that did not start on the asked
provider is an error rather than a silent CPU run.
"""

from __future__ import annotations

import functools
import os

import onnxruntime as ort

from dymoe.bundle.errors import BundleError
from dymoe.targets.providers import CPU, CPU_TARGET, CUDA, TENSORRT, ExecutionTarget, providers_for, session_config


def backbone_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ORT fuses QDQ int8/int4 weights into MatMulNBits at accuracy level 4 (int8 activations): the
# fast path on CPU, at about 1 % extra output error for int8. Level 0 computes exactly
# x @ dequantize(W) in float, roughly 15x slower; tests use it to prove the graphs are exact.
EXACT_INT_MATH = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session_options(threads: int, config: dict[str, str] | None = None, optimize: bool = True,
                    save_optimized: str | None = None, arena: bool = False) -> ort.SessionOptions:
    """``optimize=False`` for graphs ORT already optimised (the engine cache);
    ``save_optimized`` writes ORT's optimised graph to that path while building.

    ``arena``: ORT's per-session CPU arena keeps, for the session's life, the activation memory of
    the largest batch it ever ran: an int4 expert that ran a 32-token prompt held 1.6 MiB more
    than its weights (4.1 vs 2.5 MiB, same speed without it). Hundreds of resident expert
    engines cannot afford that, so only the few backbone sessions keep an arena."""
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save_optimized:
        so.optimized_model_filepath = save_optimized
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


# A graph read from bytes that names ONNX external data would make ONNX Runtime open that file
# relative to the working directory: outside the bundle, unverified. So every session gets ORT's
# table of in-memory external files instead: the checksum-verified files the manifest lists for the
# graph, or one entry no graph can name; ORT then refuses a graph that names any file not in it.
_NO_FILE = "\0dymoe: no external data"


def _external_files(so: ort.SessionOptions, files: dict[str, bytes] | None) -> None:
    table = files or {_NO_FILE: b"\0"}
    so.add_external_initializers_from_files_in_memory(list(table), list(table.values()),
                                                      [len(b) for b in table.values()])


@functools.cache
def _shared_arena(device_id: int) -> bool:
    """Register one CUDA arena on the ONNX Runtime environment for every GPU session to share
    (``session.use_env_allocators``); False when this onnxruntime cannot (then each session keeps
    its own arena, as ORT does by default)."""
    try:
        mem = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
        arena = ort.OrtArenaCfg(0, 1, -1, -1)  # no cap, kSameAsRequested growth, ORT's chunk defaults
        ort.create_and_register_allocator_v2(CUDA, mem, {"device_id": str(device_id)}, arena)
        return True
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return False


def create_session(model_bytes: bytes, threads: int, label: str, config: dict[str, str] | None = None,
                   optimize: bool = True, save_optimized: str | None = None, *, target: ExecutionTarget | None = None,
                   expert_format: str | None = None, hidden_size: int = 0, key: str | None = None,
                   precision: str | None = None, external_data: dict[str, bytes] | None = None,
                   arena: bool = False):
    """A session for ``model_bytes`` on ``target`` (default: the CPU). ``expert_format`` (the
    manifest's format of an expert graph, None for the backbone) and ``hidden_size`` choose the
    providers; ``key`` (the graph's sha256) finds a prebuilt TensorRT engine (dymoe build-engines);
    ``external_data`` holds the graph's external data files (verified bytes, by the name the graph
    gives them), copied by ONNX Runtime while the session is built."""
    target = target or CPU_TARGET
    providers = providers_for(target, expert_format, hidden_size, precision)
    if not target.is_cpu:
        from .device import check_device

        check_device(target)
        if _shared_arena(target.device_id):
            config = {**session_config(target), **(config or {})}
        save_optimized = None  # ORT's optimised graph of a GPU session is not a portable CPU graph
        if providers[0][0] == TENSORRT and target.engines is not None and key:
            from .trt_engines import prebuilt_model

            prebuilt = prebuilt_model(target, key)
            if prebuilt is not None:
                model_bytes, optimize = prebuilt, False  # an engine needs no graph optimisation
    so = session_options(threads, config, optimize, save_optimized, arena)
    _external_files(so, external_data)
    try:
        session = ort.InferenceSession(model_bytes, so,
                                       providers=[name for name, _ in providers],
                                       provider_options=[options for _, options in providers])
    except Exception as e:  # ORT raises its own types for invalid graphs
        raise BundleError(f"ONNX Runtime cannot load {label}: {e}", "re-export the bundle") from None
    if providers[0][0] != CPU and providers[0][0] not in session.get_providers():
        from .device import failed_start

        raise failed_start(target.device, session.get_providers(), None)
    # ORT's Python wrapper keeps the model bytes for as long as the session lives (its own
    # source says "this is bad as we're holding the memory indefinitely"); they are only needed
    # to rebuild the session with other providers, which we never do. Dropping them saves a whole
    # file's worth of memory per resident engine (40 % of an int4 expert's footprint).
    if getattr(session, "_model_bytes", None) is model_bytes:
        session._model_bytes = None
    if providers[0][0] == TENSORRT:
        from .chunked import ChunkedSession

        return ChunkedSession(session, target.shapes.max_tokens)
    return session
