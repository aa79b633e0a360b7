"""``dymoe build-engines``: on the device, build one TensorRT engine per distinct expert graph that
TensorRT runs, into the checksummed engine folder of ``trt_engines.py``.

* The plan: every variant of the precisions whose manifest format TensorRT runs (``float``,
  ``float16``, ``qdq_sym_int4_fp16``), deduplicated by the graph's sha256.
* Resumable: each finished engine is written atomically and recorded (fsynced) in the folder's
  journal; a rerun skips every engine the journal vouches for and whose file still verifies.
  Other settings (another TensorRT, token range or optimisation level) start a new journal and
  delete the engines the old one listed.
* One timing cache for all builds (the experts of a model share their layer shapes, so after the
  first expert most tactics are already timed), saved atomically as the build goes.
* The builder sits behind :class:`EngineBuilder`, so everything but TensorRT itself is tested
  without it; :class:`TensorRTBuilder` is the real one (strongly typed network, ONNX parser,
  optimisation profile over the token count, shared timing cache, serialized plan).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.folder import remove_listed, remove_temp_files
from dymoe.bundle.fsutil import atomic_write_bytes
from dymoe.bundle.journal import Journal
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import Manifest, read_manifest, read_verified
from dymoe.bundle.progress import Counter, ProgressFn
from dymoe.targets.devices import DeviceProfile
from dymoe.targets.providers import EXPERT_INPUT, TENSORRT_FORMATS

from .options import TRT_OPTIMIZATION_LEVEL
from .trt_engines import JOURNAL, TIMING_CACHE, BuildSettings, engine_name, read_settings, verified_engine

OPTIMIZATION_LEVEL = TRT_OPTIMIZATION_LEVEL
SAVE_TIMING_EVERY = 16  # engines between timing-cache saves (an interrupted build loses at most these timings)


@dataclass(frozen=True)
class Job:
    source_sha: str  # sha256 of the expert graph (bundle manifest)
    rel: str  # its path in the bundle
    precision: str
    layer: int
    expert: int


class EngineBuilder(Protocol):
    version: str  # the TensorRT version

    def build(self, onnx_bytes: bytes, hidden_size: int, settings: BuildSettings) -> bytes:
        """A serialized engine for the expert graph ``onnx_bytes`` (input ``x [T, hidden_size]``)."""
        ...

    def timing_cache(self) -> bytes:
        """The shared timing cache, serialized."""
        ...


def plan(manifest: Manifest, precisions: tuple[str, ...] = ()) -> list[Job]:
    """The engines to build for ``precisions`` (default: every precision TensorRT runs), one per
    distinct graph, in layer and expert order."""
    formats = manifest.quantization.formats
    runnable = [p for p in manifest.quantization.precisions if formats[p] in TENSORRT_FORMATS]
    if precisions:
        unknown = [p for p in precisions if p not in formats]
        if unknown:
            raise InputError(f"precision(s) {', '.join(unknown)} not in this bundle",
                             f"it has {', '.join(manifest.quantization.precisions)}")
        other = [p for p in precisions if p not in runnable]
        if other:
            raise InputError(f"TensorRT cannot build {', '.join(f'{p} ({formats[p]})' for p in other)}: these run on "
                             "ONNX Runtime's CUDA provider (see dymoe check BUNDLE --target PROFILE)",
                             f"build {', '.join(runnable) or 'nothing here'}; export --target tensorrt writes int4 "
                             "and fp16 in forms TensorRT runs")
        runnable = [p for p in runnable if p in precisions]
    if not runnable:
        raise InputError("no precision of this bundle is in a form TensorRT runs",
                         "export it with dymoe export MODEL --out B --target tensorrt")
    jobs, seen = [], set()
    for entry in manifest.experts:
        for p in runnable:
            rel = entry.variants[p].path
            sha = manifest.files[rel].sha256
            if sha not in seen:
                seen.add(sha)
                jobs.append(Job(sha, rel, p, entry.layer, entry.expert))
    return jobs


def settings_for(profile: DeviceProfile, tensorrt_version: str, level: int = OPTIMIZATION_LEVEL) -> BuildSettings:
    e = profile.engines
    return BuildSettings(tensorrt=tensorrt_version, compute_capability=profile.compute_capability,
                         min_tokens=e.min_tokens, opt_tokens=e.opt_tokens, max_tokens=e.max_tokens,
                         optimization_level=level)


@dataclass
class BuildReport:
    folder: Path
    built: int
    skipped: int  # already in the cache
    seconds: float
    engine_bytes: int


def build_engines(bundle: Path, folder: Path, profile: DeviceProfile, builder: EngineBuilder,
                  precisions: tuple[str, ...] = (), level: int = OPTIMIZATION_LEVEL,
                  progress: ProgressFn | None = None, on_engine: Callable[[Job], None] | None = None) -> BuildReport:
    """Build every planned engine of ``bundle`` missing from ``folder`` (resumable)."""
    manifest = read_manifest(bundle)
    jobs = plan(manifest, precisions)
    settings = settings_for(profile, builder.version, level)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with bundle_lock(folder, "build-engines"):
        remove_temp_files(folder)  # half-written engines of an interrupted run
        old, done = read_settings(folder)
        if old is not None and old != settings:  # other settings: their engines are not ours to reuse
            remove_listed(folder, [engine_name(k, v["sha256"]) for k, v in done.items() if _named(k, v)]
                          + [TIMING_CACHE])
            done = {}
        done = {k: v for k, v in done.items() if verified_engine(folder, k, v) is not None}
        journal = Journal(folder / JOURNAL, settings.fingerprint(), done)
        todo = [j for j in jobs if j.source_sha not in done]
        counter = Counter(progress, f"building TensorRT engines ({builder.version})", len(jobs), len(jobs) - len(todo))
        t0, built = time.perf_counter(), 0
        try:
            for i, job in enumerate(todo):
                data = read_verified(bundle, manifest, job.rel)
                t = time.perf_counter()
                engine = builder.build(data, manifest.model.hidden_size, settings)
                digest = atomic_write_bytes(folder / engine_name(job.source_sha, _sha(engine)), engine)
                journal.record({job.source_sha: {"file": engine_name(job.source_sha, digest), "sha256": digest,
                                                 "bytes": len(engine), "hidden_size": manifest.model.hidden_size,
                                                 "precision": job.precision, "seconds": time.perf_counter() - t}})
                done[job.source_sha] = {"sha256": digest, "bytes": len(engine)}
                built += 1
                if on_engine:
                    on_engine(job)
                if (i + 1) % SAVE_TIMING_EVERY == 0:
                    atomic_write_bytes(folder / TIMING_CACHE, builder.timing_cache())
                counter.tick()
        finally:
            if built:
                atomic_write_bytes(folder / TIMING_CACHE, builder.timing_cache())
            journal.close()
    return BuildReport(folder, built, len(jobs) - len(todo), time.perf_counter() - t0,
                       sum(int(v.get("bytes", 0)) for v in done.values()))


def _named(key: str, entry: dict) -> bool:
    try:
        engine_name(key, str(entry.get("sha256")))
        return True
    except ValueError:
        return False


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class TensorRTBuilder:
    """Engines built with the TensorRT Python API (run on the device, where ``tensorrt`` exists):
    a strongly typed network (the graphs' fp16 activations, fp16 scales and INT4 weights are kept
    exactly as written), parsed from the ONNX bytes, one optimisation profile over the token
    count, and one timing cache shared by every build."""

    def __init__(self, timing_cache: bytes = b"", workspace_bytes: int | None = None) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.version = trt.__version__
        self.logger = trt.Logger(trt.Logger.VERBOSE if os.environ.get("DYMOE_TRT_VERBOSE") else trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.workspace_bytes = workspace_bytes
        self._cache = self.builder.create_builder_config().create_timing_cache(timing_cache)

    def build(self, onnx_bytes: bytes, hidden_size: int, settings: BuildSettings) -> bytes:
        trt = self.trt
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT {self.version} cannot parse an expert graph: {errors}",
                              "check the bundle with dymoe check BUNDLE --target PROFILE")
        config = self.builder.create_builder_config()
        config.builder_optimization_level = settings.optimization_level
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        config.set_timing_cache(self._cache, False)  # False: a cache from another device or version is refused
        profile = self.builder.create_optimization_profile()
        profile.set_shape(EXPERT_INPUT, (settings.min_tokens, hidden_size), (settings.opt_tokens, hidden_size),
                          (settings.max_tokens, hidden_size))
        config.add_optimization_profile(profile)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise BundleError(f"TensorRT {self.version} could not build an engine for an expert graph",
                              "rerun with DYMOE_TRT_VERBOSE=1 to see TensorRT's log")
        return bytes(plan)

    def timing_cache(self) -> bytes:
        return bytes(self._cache.serialize())


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise DymoeError("the tensorrt Python package is not installed: dymoe build-engines builds engines on the "
                         "device itself", "on a Jetson: sudo apt install python3-libnvinfer (JetPack's TensorRT); "
                         "elsewhere: pip install tensorrt (from NVIDIA's index)") from None
    return tensorrt


def read_timing_cache(folder: Path) -> bytes:
    try:
        return (Path(folder) / TIMING_CACHE).read_bytes()
    except FileNotFoundError:
        return b""
