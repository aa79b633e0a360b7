"""Expert graphs in the forms TensorRT runs: fp16 arithmetic inside, float32 in and out.

Letters as in ``expert_graph.py`` (T tokens, H hidden, I intermediate, K/N in/out features of a
projection, B block along K). The graph keeps the bundle's interface ``x [T, H] float32 ->
y [T, H] float32`` (the backbone is float32), casts ``x`` to fp16 once and ``y`` back once:

* ``float16``: fp16 weight initializers straight into fp16 MatMuls (no Cast of the weights, so
  neither ORT nor TensorRT folds them into fp32 copies that cost twice the memory).
* ``qdq_sym_int4_fp16``: per projection, signed INT4 codes ``[K, N]`` and fp16 scales
  ``[K/B, N]`` (no zero point) -> ``DequantizeLinear(axis=0, block_size=B)`` (opset 21) -> fp16
  MatMul. This is TensorRT's INT4 weight-only pattern: the scale's type is the activations'
  type, the DQ's output feeds the MatMul directly, all constants are initializers, and a
  strongly typed build keeps every type as written. ORT's CPU and CUDA providers fuse the same
  DQ + MatMul into MatMulNBits.

B is 128, or 64 for a projection whose K is not a multiple of 128 (TensorRT's blocks are 64 or
128 and divide K); a K that neither divides is refused by the export before any work.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .blockquant import QuantizedMatrix, pack_codes
from .expert_graph import ExpertQuantStats, probe_input, reference_forward
from .onnx_build import IR_VERSION, OPSET
from .symmetric import effective as effective_weights
from .symmetric import signed_codes

TRT_BLOCKS = (128, 64)  # preferred first


def trt_block(K: int) -> int | None:
    """The INT4 block TensorRT takes for ``K`` input features (None: no block divides K)."""
    return next((b for b in TRT_BLOCKS if K % b == 0), None)


def _int4_weight(proj: str, qm: QuantizedMatrix, out: str):
    codes = signed_codes(qm)  # int8 in [-8, 7]
    # INT4 raw data: two's-complement nibbles, element 2i in the low nibble (as UINT4's layout)
    w = helper.make_tensor(f"{proj}_w", TensorProto.INT4, [qm.K, qm.N],
                           pack_codes((codes.reshape(-1) & 0xF).astype(np.uint8), 4).tobytes(), raw=True)
    scale = numpy_helper.from_array(qm.scale.astype(np.float16), f"{proj}_scale")
    node = helper.make_node("DequantizeLinear", [w.name, scale.name], [out], name=f"{proj}_dequant", axis=0,
                            block_size=qm.block_size)
    return [w, scale], [node]


def build_fp16_model(gate, up, down, precision: str, quantized: dict[str, QuantizedMatrix] | None = None,
                     name: str = "expert") -> tuple[onnx.ModelProto, ExpertQuantStats]:
    """``precision`` ``fp16`` (format ``float16``) or ``int4`` (``qdq_sym_int4_fp16``, with the symmetric
    ``quantized`` codes of gate, up and down)."""
    if precision not in ("fp16", "int4"):
        raise ValueError(f"the fp16-arithmetic forms are fp16 and int4, not {precision!r}")
    I, H = np.shape(gate)
    inits, effective = [], {}
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="x_to_fp16", to=TensorProto.FLOAT16)]
    for proj, w, a, out in (("gate", gate, "x16", "gate"), ("up", up, "x16", "up"), ("down", down, "h", "y16")):
        w_kn = np.asarray(w, dtype=np.float32).T
        if precision == "fp16":
            w16 = np.ascontiguousarray(w_kn, dtype=np.float16)
            inits.append(numpy_helper.from_array(w16, f"{proj}_w"))
            b = f"{proj}_w"
            effective[proj] = w16.astype(np.float32)
        else:
            qm = quantized[proj]
            if (qm.K, qm.N) != w_kn.shape:
                raise ValueError(f"{proj}: quantized matrix is {qm.K}x{qm.N}, expected {w_kn.shape}")
            i, n = _int4_weight(proj, qm, f"{proj}_w_dq")
            inits += i
            nodes += n
            b = f"{proj}_w_dq"
            effective[proj] = effective_weights(qm)
        nodes.append(helper.make_node("MatMul", [a, b], [out], name=f"{proj}_matmul"))
        if proj == "up":  # silu(g) = g * sigmoid(g), then * up: fused by ORT (QuickGelu) and TensorRT alike
            nodes += [helper.make_node("Sigmoid", ["gate"], ["gate_sigmoid"], name="gate_sigmoid"),
                      helper.make_node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"], name="gate_silu"),
                      helper.make_node("Mul", ["gate_silu", "up"], ["h"], name="swiglu_mul")]
    nodes.append(helper.make_node("Cast", ["y16"], ["y"], name="y_to_fp32", to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, name,
                              inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dymoe.toolchain")
    model.ir_version = IR_VERSION
    blocks = sorted({quantized[p].block_size for p in effective}) if precision == "int4" else []
    model.doc_string = (f"SwiGLU expert H={H} I={I} precision={precision} fp16 arithmetic"
                        + (f" symmetric int4 block_size={'/'.join(map(str, blocks))}" if blocks else ""))
    return model, stats_of((gate, up, down), tuple(effective[p].T for p in ("gate", "up", "down")))


def stats_of(weights, effective) -> ExpertQuantStats:
    """Weight and probe-output errors of torch-layout ``effective`` weights against ``weights``
    (the definitions of ``expert_graph.ExpertQuantStats``)."""
    err2 = ref2 = 0.0
    for w, e in zip(weights, effective, strict=True):
        w = np.asarray(w, dtype=np.float32)
        err2 += float(np.sum(np.square(w - e), dtype=np.float64))
        ref2 += float(np.sum(np.square(w), dtype=np.float64))
    x = probe_input(np.shape(weights[0])[1])
    y, y_eff = reference_forward(x, *weights), reference_forward(x, *effective)
    return ExpertQuantStats(weight_rel_error=float(np.sqrt(err2 / ref2)) if ref2 > 0 else 0.0,
                            output_rel_error=float(np.linalg.norm(y - y_eff) / max(np.linalg.norm(y), 1e-30)))
