"""Tests for dymoe.toolchain.expert_graph: per-precision SwiGLU expert ONNX graphs.

Letters: T tokens, H hidden, I intermediate, B quantization block size.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from dymoe.toolchain.blockquant import quantize_rtn
from dymoe.toolchain.expert_graph import (
    BITS,
    PRECISIONS,
    ExpertQuantStats,
    build_expert_model,
    effective_weights,
    reference_forward,
)

H, I, B = 64, 96, 32
QUANT = [("int8", "qdq"), ("int4", "qdq"), ("int8", "nbits"), ("int4", "nbits"),
         ("int2", "nbits")]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(123)
    gate = (rng.standard_normal((I, H)) / np.sqrt(H)).astype(np.float32)
    up = (rng.standard_normal((I, H)) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((H, I)) / np.sqrt(I)).astype(np.float32)
    return gate, up, down


def _x(T, seed=7):
    return np.random.default_rng(seed).standard_normal((T, H)).astype(np.float32)


def _session(model, *, exact=True, opt=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = opt
    so.log_severity_level = 3  # silence the "serializing optimized model" warning
    if exact:
        # ORT fuses DQ+MatMul into MatMulNBits with accuracy_level 4 by default, i.e. it
        # quantizes activations to int8 (~1% output error).  0 keeps float compute.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("T", [5, 1])
def test_fp32_matches_original_weights(weights, T):
    model, stats = build_expert_model(*weights, "fp32", B)
    x = _x(T)
    y = _session(model).run(None, {"x": x})[0]
    assert y.shape == (T, H) and y.dtype == np.float32
    assert _rel(y, reference_forward(x, *weights)) < 1e-6
    assert stats == ExpertQuantStats(0.0, 0.0)


@pytest.mark.parametrize("T", [5, 1])
def test_fp16_matches_rounded_weights(weights, T):
    model, stats = build_expert_model(*weights, "fp16", B)
    x = _x(T)
    y = _session(model).run(None, {"x": x})[0]
    w16 = [w.astype(np.float16).astype(np.float32) for w in weights]
    assert _rel(y, reference_forward(x, *w16)) < 1e-5
    assert 0 < stats.weight_rel_error < 1e-3 and 0 < stats.output_rel_error < 1e-3


@pytest.mark.parametrize("T", [5, 1])
@pytest.mark.parametrize("precision,fmt", QUANT)
def test_quantized_matches_dequantized_reference(weights, precision, fmt, T):
    # accuracy_level=0: float compute in MatMulNBits, so ORT == x @ dequantize(qm)
    model, _ = build_expert_model(*weights, precision, B, fmt=fmt, accuracy_level=0)
    x = _x(T)
    ref = reference_forward(x, *effective_weights(*weights, precision, B))
    y = _session(model).run(None, {"x": x})[0]
    assert _rel(y, ref) < 1e-5
    if fmt == "qdq":
        # unfused path: ORT's blocked DequantizeLinear kernel + MatMul
        y = _session(model, opt=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
        assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("precision,fmt", QUANT)
def test_default_accuracy_level_is_close(weights, precision, fmt):
    """ORT defaults (accuracy_level 4: int8 activations in MatMulNBits) add ~1% error."""
    model, _ = build_expert_model(*weights, precision, B, fmt=fmt)
    x = _x(5)
    ref = reference_forward(x, *effective_weights(*weights, precision, B))
    y = _session(model, exact=False).run(None, {"x": x})[0]
    assert _rel(y, ref) < 5e-2


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_qdq_matches_onnx_reference_evaluator(weights, precision):
    """ONNX-spec semantics of the QDQ graph, independent of ORT's fusions."""
    from onnx.reference import ReferenceEvaluator

    model, _ = build_expert_model(*weights, precision, B)
    x = _x(3)
    y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    ref = reference_forward(x, *effective_weights(*weights, precision, B))
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("precision,fmt,block", [("int4", "qdq", 48), ("int8", "qdq", 48),
                                                 ("int2", "nbits", 64), ("int4", "nbits", 64)])
def test_k_not_multiple_of_block(weights, precision, fmt, block):
    # H=64, I=96: gate/up have K=64, down has K=96 -> a short last block somewhere
    model, _ = build_expert_model(*weights, precision, block, fmt=fmt, accuracy_level=0)
    x = _x(4)
    ref = reference_forward(x, *effective_weights(*weights, precision, block))
    assert _rel(_session(model).run(None, {"x": x})[0], ref) < 1e-5


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_qdq_fuses_to_matmulnbits(weights, precision, tmp_path):
    model, _ = build_expert_model(*weights, precision, B)
    path = tmp_path / "opt.onnx"
    _session(model, exact=False, optimized_path=path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 3, ops
    assert "DequantizeLinear" not in ops and "MatMul" not in ops, ops


def test_error_ordering(weights):
    stats = {p: build_expert_model(*weights, p, B)[1] for p in PRECISIONS}
    out = [stats[p].output_rel_error for p in PRECISIONS]
    wts = [stats[p].weight_rel_error for p in PRECISIONS]
    assert out == sorted(out) and len(set(out)) == len(out), stats
    assert wts == sorted(wts) and len(set(wts)) == len(wts), stats
    assert stats["int8"].output_rel_error < stats["int4"].output_rel_error \
        < stats["int2"].output_rel_error


def test_stats_definition(weights):
    _, stats = build_expert_model(*weights, "int4", B)
    eff = effective_weights(*weights, "int4", B)
    num = sum(np.sum((w - e) ** 2) for w, e in zip(weights, eff, strict=True))
    den = sum(np.sum(w ** 2) for w in weights)
    assert stats.weight_rel_error == pytest.approx(np.sqrt(num / den), rel=1e-5)
    xp = np.random.default_rng(0).standard_normal((16, H)).astype(np.float32)
    y = reference_forward(xp, *weights)
    assert stats.output_rel_error == pytest.approx(_rel(reference_forward(xp, *eff), y), rel=1e-4)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_model_structure(weights, precision):
    model, _ = build_expert_model(*weights, precision, B, name="layer3_expert7")
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert g.name == "layer3_expert7"
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["y"]
    for vi in (g.input[0], g.output[0]):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "T" and dims[1].dim_value == H
    names = [t.name for t in g.initializer]
    assert len(names) == len(set(names))
    assert {"gate_w", "up_w", "down_w"} <= set(names)
    assert model.ir_version == 10
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == 21
    if precision == "int2":
        assert opsets["com.microsoft"] == 1
        assert sorted(n.op_type for n in g.node).count("MatMulNBits") == 3
    if precision in ("int8", "int4"):
        assert {"gate_scale", "gate_zero_point"} <= set(names)


def test_uint4_initializer_roundtrip(weights):
    model, _ = build_expert_model(*weights, "int4", B)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["down_w"].data_type == TensorProto.UINT4
    assert inits["down_zero_point"].data_type == TensorProto.UINT4
    qm = quantize_rtn(weights[2].T, 4, B)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["down_w"]).astype(np.uint8), qm.q)
    np.testing.assert_array_equal(
        numpy_helper.to_array(inits["down_zero_point"]).astype(np.uint8), qm.zero_point)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["down_scale"]), qm.scale)
    # 4-bit payload really is packed: K*N/2 bytes
    assert len(inits["down_w"].raw_data) == I * H // 2


def test_invalid_arguments(weights):
    with pytest.raises(ValueError):
        build_expert_model(*weights, "int3", B)
    with pytest.raises(ValueError):
        build_expert_model(*weights, "int2", B, fmt="qdq")
    with pytest.raises(ValueError):
        build_expert_model(*weights, "int4", 48, fmt="nbits")
    gate, up, down = weights
    with pytest.raises(ValueError):
        build_expert_model(gate, up, down.T, "fp32", B)
    assert set(BITS) == {"int8", "int4", "int2"}
