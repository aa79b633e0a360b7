"""``dymoe build-engines`` without TensorRT: the plan of what to build, the checksummed cache and its
names, resuming after an interruption, rebuilding what was damaged or built with other settings,
the EPContext wrapper the runtime hands to ONNX Runtime, and a clean error where tensorrt is
missing. The builder is faked behind ``EngineBuilder``; ``TensorRTBuilder`` needs a device."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.manifest import read_manifest
from dymoe.runtime.chunked import ChunkedSession
from dymoe.runtime.trt_build import build_engines, plan
from dymoe.runtime.trt_engines import JOURNAL, TIMING_CACHE, engine_name, prebuilt_model, read_settings
from dymoe.targets.devices import load_device
from dymoe.targets.providers import TENSORRT, ExecutionTarget
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

PROFILE = load_device("orin-nano-8gb")


class FakeBuilder:
    """An 'engine' is a digest of the graph and settings; fails on demand after ``stop_after`` builds."""

    def __init__(self, version: str = "10.3.0", stop_after: int | None = None) -> None:
        self.version = version
        self.stop_after = stop_after
        self.built: list[str] = []

    def build(self, onnx_bytes, hidden_size, settings):
        if self.stop_after is not None and len(self.built) >= self.stop_after:
            raise KeyboardInterrupt
        self.built.append(hashlib.sha256(onnx_bytes).hexdigest())
        return b"engine:" + hashlib.sha256(onnx_bytes + settings.fingerprint().encode()).digest() * 8

    def timing_cache(self):
        return f"timings of {len(self.built)} builds".encode()


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    write_synthetic_checkpoint(root / "src", hidden=64, intermediate=64, experts=3, layers=2, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=32)
    export(str(root / "src"), root / "b", ExportOptions(precisions=("fp16", "int8", "int4", "int2"),
                                                        target="tensorrt"))
    return root / "b"


def test_the_plan_is_every_graph_tensorrt_runs_once(trt_bundle):
    m = read_manifest(trt_bundle)
    jobs = plan(m)
    assert {j.precision for j in jobs} == {"fp16", "int4"}  # int8 / int2 are MatMulNBits: CUDA's
    assert len(jobs) == len({j.source_sha for j in jobs}) == 2 * 2 * 3
    assert [j.precision for j in plan(m, ("int4",))] == ["int4"] * 6
    with pytest.raises(InputError, match="int2 \\(matmulnbits\\)"):
        plan(m, ("int2",))
    with pytest.raises(InputError, match="not in this bundle"):
        plan(m, ("fp32",))


def test_a_portable_bundle_offers_only_its_float_graphs(tiny_qwen3):
    m = read_manifest(tiny_qwen3.bundle)  # fp32, int8, int4, int2 in the portable forms
    assert {j.precision for j in plan(m)} == {"fp32"}
    with pytest.raises(InputError, match="int4 \\(qdq\\)"):
        plan(m, ("int4",))


def test_build_names_verifies_and_resumes(trt_bundle, tmp_path):
    folder = tmp_path / "engines"
    first = FakeBuilder(stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        build_engines(trt_bundle, folder, PROFILE, first)
    settings, done = read_settings(folder)
    assert len(done) == 5 and settings.tensorrt == "10.3.0" and settings.max_tokens == 256
    assert (folder / TIMING_CACHE).read_bytes() == b"timings of 5 builds"  # saved on the way out
    for src, entry in done.items():  # the self-verifying names
        name = engine_name(src, entry["sha256"])
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"] and entry["file"] == name

    second = FakeBuilder()
    report = build_engines(trt_bundle, folder, PROFILE, second)
    assert (report.built, report.skipped) == (7, 5) and set(second.built).isdisjoint(first.built)
    assert len(read_settings(folder)[1]) == 12

    # a damaged engine is rebuilt, and only it
    src, entry = next(iter(read_settings(folder)[1].items()))
    (folder / engine_name(src, entry["sha256"])).write_bytes(b"bit rot")
    third = FakeBuilder()
    assert build_engines(trt_bundle, folder, PROFILE, third).built == 1 and third.built == [src]

    # another TensorRT: every engine rebuilt, the old ones (listed in the old journal) deleted
    old_files = {p.name for p in folder.glob("*.plan")}
    fourth = FakeBuilder(version="10.16.0")
    assert build_engines(trt_bundle, folder, PROFILE, fourth).built == 12
    assert not old_files & {p.name for p in folder.glob("*.plan")}
    assert read_settings(folder)[0].tensorrt == "10.16.0"
    assert not list(folder.glob("*.tmp"))


def test_the_runtime_loads_a_prebuilt_engine_as_an_epcontext_model(trt_bundle, tmp_path):
    folder = tmp_path / "engines"
    build_engines(trt_bundle, folder, PROFILE, FakeBuilder())
    m = read_manifest(trt_bundle)
    rel = m.experts[0].variants["int4"].path
    target = ExecutionTarget("tensorrt", PROFILE, engines=folder)
    data = prebuilt_model(target, m.files[rel].sha256)
    model = onnx.load_model_from_string(data)
    (node,) = model.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    src = m.files[rel].sha256
    entry = read_settings(folder)[1][src]
    assert (node.op_type, node.domain) == ("EPContext", "com.microsoft")
    assert attrs["embed_mode"] == 1 and attrs["hardware_architecture"] == b"87" and attrs["source"] == TENSORRT.encode()
    assert attrs["ep_cache_context"] == (folder / engine_name(src, entry["sha256"])).read_bytes()
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    assert prebuilt_model(target, "0" * 64) is None  # not built: ONNX Runtime builds it itself

    xavier = ExecutionTarget("tensorrt", dataclasses.replace(PROFILE, compute_capability="7.2"), engines=folder)
    with pytest.raises(BundleError, match="compute capability"):
        prebuilt_model(xavier, src)

    (folder / engine_name(src, entry["sha256"])).write_bytes(b"swapped")
    with pytest.raises(BundleError, match="missing or damaged"):
        prebuilt_model(target, src)


def test_an_empty_engine_folder_is_a_clean_error(tmp_path):
    with pytest.raises(BundleError, match=JOURNAL):
        prebuilt_model(ExecutionTarget("tensorrt", PROFILE, engines=tmp_path), "0" * 64)


def test_without_tensorrt_build_engines_says_what_to_install(trt_bundle):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from dymoe.runtime.trt_build import import_tensorrt

    with pytest.raises(DymoeError, match="tensorrt Python package"):
        import_tensorrt()
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "build-engines", str(trt_bundle), "--target",
                           "orin-nano-8gb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "python3-libnvinfer" in proc.stderr


def test_chunked_session_cuts_long_calls():
    class Rows:
        def __init__(self):
            self.calls = []

        def run(self, names, feeds):
            self.calls.append(len(feeds["x"]))
            return [feeds["x"] * 2]

    inner = Rows()
    s = ChunkedSession(inner, 4)
    x = np.arange(22, dtype=np.float32).reshape(11, 2)
    (y,) = s.run(["y"], {"x": x})
    assert np.array_equal(y, x * 2) and inner.calls == [4, 4, 3]
    s.run(["y"], {"x": x[:3]})
    assert inner.calls[-1] == 3


def test_check_command_prints_and_writes_the_table(trt_bundle, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "check", str(trt_bundle), "--target", "orin-nano-8gb",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "qdq_sym_int4_fp16" in proc.stdout and "JetPack 6.2" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["precision"]: r for r in data["precisions"]}
    assert data["target"] == "orin-nano-8gb"
    assert rows["int4"]["best"] == "tensorrt" and rows["int8"]["best"] == "cuda" and rows["int2"]["best"] == "cpu"
    assert rows["int4"]["blocks"] == [64]


class _FakeTrt:
    """The slice of the TensorRT Python API TensorRTBuilder uses, recording the calls (the real one
    needs a GPU): a strongly typed network, the ONNX parser, a shared timing cache, one profile."""

    __version__ = "10.3.0"

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = 0

    calls: list = []
    parse_ok = True
    plan = b"serialized engine"

    class _Cache:
        def serialize(self):
            return memoryview(b"timings")

    class _Config:
        builder_optimization_level = None

        def create_timing_cache(self, data):
            _FakeTrt.calls.append(("create_timing_cache", bytes(data)))
            return _FakeTrt._Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            _FakeTrt.calls.append(("set_timing_cache", ignore_mismatch))

        def set_memory_pool_limit(self, pool, size):
            _FakeTrt.calls.append(("workspace", size))

        def add_optimization_profile(self, profile):
            _FakeTrt.calls.append(("profile", profile.shapes))

    class _Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_builder_config(self):
            return _FakeTrt._Config()

        def create_network(self, flags):
            _FakeTrt.calls.append(("network_flags", flags))
            return object()

        def create_optimization_profile(self):
            return _FakeTrt._Profile()

        def build_serialized_network(self, network, config):
            _FakeTrt.calls.append(("level", config.builder_optimization_level))
            return _FakeTrt.plan

    class OnnxParser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            return _FakeTrt.parse_ok

        def get_error(self, i):
            class E:
                def desc(self):
                    return "Unsupported ONNX data type: UINT4"

            return E()


def test_tensorrt_builder_uses_the_api_as_documented(monkeypatch, trt_bundle):
    from dymoe.runtime.trt_build import TensorRTBuilder, settings_for

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt)
    _FakeTrt.calls = []
    b = TensorRTBuilder(b"old timings", workspace_bytes=1 << 29)
    settings = settings_for(PROFILE, b.version, 4)
    assert b.build(b"onnx", 2048, settings) == b"serialized engine"
    calls = dict(_FakeTrt.calls)
    assert calls["create_timing_cache"] == b"old timings" and calls["set_timing_cache"] is False
    assert calls["network_flags"] == 1 << 1  # 1 << STRONGLY_TYPED
    assert calls["profile"] == ("x", (1, 2048), (1, 2048), (256, 2048))
    assert calls["level"] == 4 and calls["workspace"] == 1 << 29
    assert b.timing_cache() == b"timings"
    _FakeTrt.parse_ok = False
    with pytest.raises(BundleError, match="UINT4"):
        b.build(b"onnx", 2048, settings)
    _FakeTrt.parse_ok, _FakeTrt.plan = True, None
    with pytest.raises(BundleError, match="could not build"):
        b.build(b"onnx", 2048, settings)
    _FakeTrt.plan = b"serialized engine"
