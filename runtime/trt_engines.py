"""The checksummed cache of TensorRT engines that ``dymoe build-engines`` writes and ``--engines``
reads, and the ONNX wrapper that hands a prebuilt engine to ONNX Runtime's TensorRT provider.

Layout of an engine folder (one per device profile, by default
``$XDG_CACHE_HOME/dymoe/trt-engines/<profile>``)::

    engines.jsonl                 journal: line 1 the build settings (TensorRT version, compute
                                  capability, token range, optimisation level); then one line per
                                  finished engine {"path": source sha256, "file", "bytes", "sha256",
                                  "hidden_size", "seconds"}
    timing.cache                  TensorRT's timing cache, shared by every build
    <source sha256>.<engine sha256>.plan     one serialized engine per distinct expert graph

An engine is named by the sha256 of the ONNX graph it was built from and by its own sha256, so a
damaged or swapped file is detected on load, and a bundle file that changed has no engine.
Engines depend on the TensorRT version and the GPU: built on the device, never shipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dymoe.bundle.errors import BundleError
from dymoe.bundle.journal import read_journal
from dymoe.bundle.paths import is_sha256
from dymoe.targets.providers import EXPERT_INPUT, TENSORRT, ExecutionTarget

JOURNAL = "engines.jsonl"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildSettings:
    """What an engine depends on besides its graph: a different value means different engines."""

    tensorrt: str  # TensorRT version that built it (ONNX Runtime must link the same)
    compute_capability: str  # "8.7"
    min_tokens: int
    opt_tokens: int
    max_tokens: int
    optimization_level: int
    strongly_typed: bool = True

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def default_dir(profile_name: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dymoe" / "trt-engines" / profile_name


def engine_name(source_sha: str, engine_sha: str) -> str:
    """The self-verifying file name of an engine (both parts checked to be sha256 digests first)."""
    if not (is_sha256(source_sha) and is_sha256(engine_sha)):
        raise ValueError("engine names are made of sha256 hex digests")
    return f"{source_sha}.{engine_sha}.plan"


def read_settings(folder: Path) -> tuple[BuildSettings | None, dict[str, dict]]:
    """The settings and finished entries of an engine folder's journal (None, {} when there is none)."""
    fingerprint, done = read_journal(Path(folder) / JOURNAL)
    if fingerprint is None:
        return None, {}
    try:
        settings = BuildSettings(**json.loads(fingerprint))
    except (TypeError, ValueError):
        return None, {}
    return settings, {k: v for k, v in done.items() if is_sha256(k) and isinstance(v, dict)}


def verified_engine(folder: Path, source_sha: str, entry: dict) -> bytes | None:
    """The engine bytes of ``entry`` when its file exists and matches its name's sha256."""
    try:
        name = engine_name(source_sha, str(entry.get("sha256")))
        data = (Path(folder) / name).read_bytes()
    except (ValueError, OSError):
        return None
    return data if hashlib.sha256(data).hexdigest() == entry["sha256"] else None


def epcontext_model(engine: bytes, hidden_size: int, sm: str) -> bytes:
    """An ONNX model ``x [T, H] float32 -> y [T, H] float32`` whose one node is ONNX Runtime's
    ``com.microsoft::EPContext`` carrying ``engine`` inside (embed_mode 1: no path is read)."""
    from onnx import TensorProto, helper

    node = helper.make_node("EPContext", [EXPERT_INPUT], ["y"], name="trt_engine", domain="com.microsoft",
                            embed_mode=1, ep_cache_context=engine, hardware_architecture=sm, source=TENSORRT)
    graph = helper.make_graph([node], "expert_engine",
                              [helper.make_tensor_value_info(EXPERT_INPUT, TensorProto.FLOAT, ["T", hidden_size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden_size])])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


@functools.lru_cache(maxsize=4)
def _index(folder: str, stamp: tuple[int, int]) -> tuple[BuildSettings | None, dict[str, dict]]:
    return read_settings(Path(folder))


def prebuilt_model(target: ExecutionTarget, source_sha: str) -> bytes | None:
    """The EPContext model of the prebuilt engine for graph ``source_sha`` in ``target.engines``
    (None: not built, so ONNX Runtime builds one itself). An engine folder built for another GPU
    or token range is an error, not a silent rebuild."""
    folder = Path(target.engines)
    try:
        st = os.stat(folder / JOURNAL)
    except OSError:
        raise BundleError(f"{folder} holds no TensorRT engines ({JOURNAL} is missing)",
                          "build them on the device: dymoe build-engines BUNDLE --target PROFILE") from None
    settings, done = _index(str(folder), (st.st_size, st.st_mtime_ns))
    if settings is None:
        raise BundleError(f"{folder / JOURNAL} is unreadable", "rebuild: dymoe build-engines BUNDLE --target PROFILE")
    s, profile = target.shapes, target.profile
    if profile is not None and settings.compute_capability != profile.compute_capability:
        raise BundleError(f"the engines in {folder} were built for compute capability {settings.compute_capability}, "
                          f"the target {profile.name} is {profile.compute_capability}",
                          "build engines for this device: dymoe build-engines BUNDLE --target PROFILE")
    if (settings.min_tokens, settings.opt_tokens, settings.max_tokens) != (s.min_tokens, s.opt_tokens, s.max_tokens):
        raise BundleError(f"the engines in {folder} take {settings.min_tokens}..{settings.max_tokens} tokens, the "
                          f"target {s.min_tokens}..{s.max_tokens}", "rebuild them with the same --target")
    entry = done.get(source_sha)
    if entry is None:
        return None
    engine = verified_engine(folder, source_sha, entry)
    if engine is None:
        raise BundleError(f"the engine of {source_sha[:12]}... in {folder} is missing or damaged",
                          "rerun dymoe build-engines to rebuild it")
    return epcontext_model(engine, int(entry["hidden_size"]), settings.compute_capability.replace(".", ""))
