"""``dymoe export --target tensorrt``: every TensorRT-form graph passes the checker and, on the CPU
provider, dequantizes to exactly its codes times its fp16 scales; the portable forms fail the
TensorRT rules for the documented reasons; the rules themselves, table by table."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.manifest import read_manifest
from dymoe.runtime.check import check_bundle
from dymoe.runtime.graph_facts import graph_facts
from dymoe.runtime.ort_session import EXACT_INT_MATH, session_options
from dymoe.targets.devices import load_device
from dymoe.targets.rules import GraphFacts, WeightFacts, verdicts
from dymoe.toolchain.expert_graph import reference_forward
from dymoe.toolchain.expert_weights import expert_weights, quantized_matrices
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.symmetric import effective
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

ALL = ("fp32", "fp16", "int8", "int4", "int2")


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """hidden 128, intermediate 64: gate and up take blocks of 128, down (K = 64) blocks of 64."""
    root = tmp_path_factory.mktemp("trt")
    write_synthetic_checkpoint(root / "src", hidden=128, intermediate=64, experts=4, layers=2, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=32)
    export(str(root / "src"), root / "b", ExportOptions(precisions=ALL, target="tensorrt"))
    return root / "b"


def test_the_manifest_records_each_precisions_form(trt_bundle):
    formats = read_manifest(trt_bundle).quantization.formats
    assert formats == {"fp32": "float", "fp16": "float16", "int8": "matmulnbits", "int4": "qdq_sym_int4_fp16",
                       "int2": "matmulnbits"}


def test_every_tensorrt_form_graph_passes_the_checker(trt_bundle):
    checks = {c.precision: c for c in check_bundle(trt_bundle, load_device("orin-nano-8gb"), every=True)}
    assert all(c.graphs == 8 for c in checks.values())  # 2 layers x 4 experts, every one read
    for p in ("fp32", "fp16", "int4"):
        assert checks[p].verdicts["tensorrt"].ok, checks[p].verdicts["tensorrt"].reasons
        assert checks[p].best == "tensorrt"
    assert checks["int4"].blocks == [64, 128]
    assert checks["int8"].best == "cuda" and not checks["int8"].verdicts["tensorrt"].ok
    # the Orin profiles' onnxruntime-gpu has no 2-bit CUDA kernel: int2 is CPU-only there
    assert checks["int2"].best == "cpu"
    assert "2-bit MatMulNBits" in checks["int2"].verdicts["cuda"].reasons[0]
    assert all(c.verdicts["cpu"].ok for c in checks.values())


def _dequant_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every DequantizeLinear's output also a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear":
            m.graph.output.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT16, None))
    return m


def test_int4_graphs_compute_exactly_their_dequantized_weights_on_cpu(trt_bundle):
    m = read_manifest(trt_bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, m.model.hidden_size)).astype(np.float32)
    for entry in m.experts:
        model = onnx.load(trt_bundle / entry.variants["int4"].path)
        mats = quantized_matrices(model)
        assert {q.zero_point.min() for q in mats.values()} == {8}  # symmetric: the stored code is c + 8
        sess = ort.InferenceSession(_dequant_outputs(model).SerializeToString(), session_options(1, EXACT_INT_MATH),
                                    providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))
        for proj, qm in mats.items():
            codes = qm.q.astype(np.float16) - np.float16(8)
            want = codes * np.repeat(qm.scale.astype(np.float16), qm.block_size, axis=0)[:qm.K]  # fp16 products
            assert np.array_equal(outs[f"{proj}_w_dq"], want), proj
            assert np.array_equal(effective(qm), want.astype(np.float32))  # the repository's reference agrees
        # the whole expert: x @ W_dq with fp16 activations, against float32 maths on the same weights
        y = outs["y"]
        ref = reference_forward(x, *expert_weights(model))
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 5e-3


def test_fp16_graph_keeps_fp16_weights_and_reads_back(trt_bundle):
    m = read_manifest(trt_bundle)
    model = onnx.load(trt_bundle / m.experts[0].variants["fp16"].path)
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert not any(n.op_type == "Cast" and n.input[0].endswith("_w") for n in model.graph.node)  # no fp32 copy
    g32 = expert_weights(onnx.load(trt_bundle / m.experts[0].variants["fp32"].path))
    g16 = expert_weights(model)
    for a, b in zip(g32, g16, strict=True):
        assert np.array_equal(a.astype(np.float16).astype(np.float32), b)


def test_the_portable_forms_fail_tensorrt_for_the_documented_reasons(tiny_qwen3):
    checks = {c.precision: c for c in check_bundle(tiny_qwen3.bundle)}
    int4 = checks["int4"].verdicts["tensorrt"]
    assert not int4.ok
    assert any("UINT4" in r for r in int4.reasons) and any("symmetric" in r for r in int4.reasons)
    assert any("block 32" in r for r in int4.reasons)
    assert checks["int4"].verdicts["cuda"].ok  # ORT's CUDA provider fuses it into MatMulNBits
    assert "no INT8 weight-only" in checks["int8"].verdicts["tensorrt"].reasons[0]
    assert "contrib op" in checks["int2"].verdicts["tensorrt"].reasons[0]
    assert checks["fp32"].verdicts["tensorrt"].ok


GOOD = WeightFacts("gate", "MatMul", "int4", 4, 256, 64, "float16", block_size=128, axis=0, zero_point="none",
                   scale_type="float16")


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"zero_point": "zero"}, None),  # an all-zero zero point is allowed by TensorRT
    ({"block_size": 64}, None),
    ({"axis": 1}, None),  # the other of the last two axes
    ({"weight_type": "uint4"}, "signed"),
    ({"zero_point": "nonzero"}, "symmetric"),
    ({"block_size": 32}, "64 or 128"),
    ({"block_size": 128, "K": 192}, "does not divide"),
    ({"rank": 3, "axis": 0}, "last two"),
    ({"scale_type": "float32"}, "fp16 scales for fp16 activations"),
    ({"constant": False}, "constant initializers"),
    ({"direct": False}, "straight into the MatMul"),
    ({"weight_type": "int8", "bits": 8, "block_size": None}, "no INT8 weight-only"),
])
def test_tensorrt_int4_rules(change, reason):
    g = GraphFacts(21, ("",), (dataclasses.replace(GOOD, **change),))
    v = verdicts(g, tensorrt="10.3")[0]
    assert v.provider == "tensorrt"
    if reason is None:
        assert v.ok, v.reasons
        assert "strongly typed" in v.notes[0]
    else:
        assert not v.ok and any(reason in r for r in v.reasons), v.reasons


@pytest.mark.parametrize("facts, tensorrt, cuda_bits, want", [
    (GraphFacts(19, ("",), (GOOD,)), "10.3", (4, 8), {"tensorrt": False, "cuda": True, "cpu": False}),  # opset 19
    (GraphFacts(21, ("",), (GOOD,)), "8.6", (4, 8), {"tensorrt": False, "cuda": True, "cpu": True}),  # TRT 8: no INT4
    (GraphFacts(21, ("", "com.microsoft"), (WeightFacts("up", "MatMulNBits", "uint8", 2, 64, 64, "float32",
                                                       block_size=32),)), None, (2, 4, 8),
     {"tensorrt": False, "cuda": True, "cpu": True}),  # a profile whose onnxruntime-gpu has 2-bit kernels
    (GraphFacts(21, ("", "com.example"), ()), None, (4, 8), {"tensorrt": False, "cuda": False, "cpu": False}),
    (GraphFacts(21, ("",), (WeightFacts("up", "MatMul", "float32", None, 64, 64, "float32"),)), None, (4, 8),
     {"tensorrt": True, "cuda": True, "cpu": True}),
])
def test_provider_verdicts(facts, tensorrt, cuda_bits, want):
    assert {v.provider: v.ok for v in verdicts(facts, cuda_bits, tensorrt)} == want


def test_graph_facts_read_the_symmetric_form(trt_bundle):
    m = read_manifest(trt_bundle)
    facts = graph_facts(onnx.load(trt_bundle / m.experts[0].variants["int4"].path))
    assert facts.opset == 21 and facts.domains == ("",)
    by = {w.name: w for w in facts.weights}
    assert (by["gate"].weight_type, by["gate"].block_size, by["gate"].scale_type, by["gate"].activation_type,
            by["gate"].zero_point, by["gate"].axis) == ("int4", 128, "float16", "float16", "none", 0)
    assert (by["down"].K, by["down"].block_size) == (64, 64)


def test_symmetric_int4_rejects_dimensions_tensorrt_cannot_block(tmp_path):
    write_synthetic_checkpoint(tmp_path / "src", hidden=96, intermediate=64, experts=2, layers=1, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=16)
    with pytest.raises(InputError, match="hidden_size 96 is not a multiple of 64"):
        export(str(tmp_path / "src"), tmp_path / "b", ExportOptions(precisions=("fp16", "int4"), target="tensorrt"))
    assert not (tmp_path / "b" / "manifest.json").exists()
    # without int4 nothing needs TensorRT's blocks
    export(str(tmp_path / "src"), tmp_path / "b", ExportOptions(precisions=("fp16", "int8"), target="tensorrt"))


def test_requantize_refuses_to_rewrite_the_tensorrt_form(trt_bundle):
    from dymoe.toolchain.requantize import RequantizeOptions, requantize

    with pytest.raises(InputError, match="qdq_sym_int4_fp16"):
        requantize(trt_bundle, RequantizeOptions(precisions=("int4",)))


def test_a_format_that_cannot_hold_its_precision_is_refused(trt_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(trt_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["quantization"]["formats"]["int2"] = "qdq_sym_int4_fp16"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="formats.int2"):
        read_manifest(copy)


def test_tensorrt_bundle_generates_on_cpu_close_to_fp32(trt_bundle):
    from dymoe.runtime.model_session import open_model

    logits = {}
    for p in ("fp32", "fp16", "int4"):
        s = open_model(trt_bundle, precision=p)
        try:
            cache = s.model.new_cache()
            logits[p] = s.model.forward(np.arange(6), cache, all_logits=True)
        finally:
            s.close()
    ref = logits["fp32"]
    for p, bound in (("fp16", 5e-3), ("int4", 0.35)):  # the README's end-to-end int4 bound on random models
        assert np.linalg.norm(logits[p] - ref) / np.linalg.norm(ref) < bound, p
