"""ONNX Runtime session settings that suit small devices.

Many expert sessions, each with ORT's default thread pool, spin and fight over two cores; so
expert sessions run single-threaded without spinning, and only the backbone gets a small pool.
"""

from __future__ import annotations

import os

import onnxruntime as ort

from dymoe.bundle.errors import BundleError


def backbone_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ORT fuses QDQ int8/int4 weights into MatMulNBits at accuracy level 4 (int8 activations): the
# fast path on CPU, at about 1 % extra output error for int8. Level 0 computes exactly
# x @ dequantize(W) in float, roughly 15x slower; tests use it to prove the graphs are exact.
EXACT_INT_MATH = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session_options(threads: int, config: dict[str, str] | None = None, optimize: bool = True,
                    save_optimized: str | None = None) -> ort.SessionOptions:
    """``optimize=False`` for graphs ORT already optimised (the engine cache);
    ``save_optimized`` writes ORT's optimised graph to that path while building."""
    so = ort.SessionOptions()
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


def create_session(model_bytes: bytes, threads: int, label: str, config: dict[str, str] | None = None,
                   optimize: bool = True, save_optimized: str | None = None) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(model_bytes, session_options(threads, config, optimize, save_optimized),
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types for invalid graphs
        raise BundleError(f"ONNX Runtime cannot load {label}: {e}", "re-export the bundle") from None
    # ORT's Python wrapper keeps the model bytes for as long as the session lives (its own
    # source says "this is bad as we're holding the memory indefinitely"); they are only needed
    # to rebuild the session with other providers, which we never do. Dropping them saves a whole
    # file's worth of memory per resident engine (40 % of an int4 expert's footprint).
    if getattr(session, "_model_bytes", None) is model_bytes:
        session._model_bytes = None
    return session
