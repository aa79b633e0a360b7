"""Read back the weights an expert graph computes with (the inverse of ``expert_graph``).

``dymoe requantize`` takes the source weights from a bundle's float variant this way, and the tests
use it to load transformers with exactly what a quantized graph multiplies by, whichever quantizer
chose the codes. Returned in torch ``Linear`` layout, float32: gate, up ``[I, H]``, down ``[H, I]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .blockquant import QuantizedMatrix, dequantize, unpack_codes

_PROJS = ("gate", "up", "down")


def _nbits_matrix(node: onnx.NodeProto, init: dict[str, np.ndarray], proj: str) -> QuantizedMatrix:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    K, N, bits, B = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    nb = -(-K // B)
    codes = unpack_codes(init[f"{proj}_w"], bits, B).reshape(N, nb * B)[:, :K]
    zp = unpack_codes(init[f"{proj}_zero_point"], bits, nb)  # [N, nb]
    return QuantizedMatrix(q=np.ascontiguousarray(codes.T), scale=np.ascontiguousarray(init[f"{proj}_scale"].T),
                           zero_point=np.ascontiguousarray(zp.T), bits=bits, block_size=B, K=K, N=N)


def quantized_matrices(model: onnx.ModelProto) -> dict[str, QuantizedMatrix]:
    """The ``[K, N]`` codes of each quantized projection (empty for a float expert)."""
    protos = {t.name: t for t in model.graph.initializer}
    init = {name: numpy_helper.to_array(t) for name, t in protos.items()}
    out = {}
    for node in model.graph.node:
        proj = node.name.split("_", 1)[0]
        if node.op_type == "MatMulNBits":
            out[proj] = _nbits_matrix(node, init, proj)
        elif node.op_type == "DequantizeLinear":
            kind = protos[f"{proj}_w"].data_type
            bits = 8 if kind in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) else 4
            block = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")
            scale = init[f"{proj}_scale"].astype(np.float32)  # fp16 scales are exact in float32
            if f"{proj}_zero_point" in init:
                q, zp = init[f"{proj}_w"].astype(np.uint8), init[f"{proj}_zero_point"].astype(np.uint8)
            else:  # symmetric signed codes (trt_graph.py): kept as q = c + 2^(bits-1), zero point 2^(bits-1)
                offset = 1 << (bits - 1)
                q = (init[f"{proj}_w"].astype(np.int16) + offset).astype(np.uint8)
                zp = np.full(scale.shape, offset, dtype=np.uint8)
            K, N = q.shape
            out[proj] = QuantizedMatrix(q=q, scale=scale, zero_point=zp, bits=bits, block_size=block, K=K, N=N)
    return out


def expert_weights(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 torch-layout ``(gate, up, down)`` of an expert graph at any precision."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = quantized_matrices(model)
    fp16_scales = {t.name[:-len("_scale")] for t in model.graph.initializer
                   if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT16}
    out = []
    for proj in _PROJS:
        if proj in quantized:
            w_kn = dequantize(quantized[proj])
            if proj in fp16_scales:  # DequantizeLinear returns the product in the scale's type
                w_kn = w_kn.astype(np.float16).astype(np.float32)
        elif f"{proj}_w" in init:
            w_kn = init[f"{proj}_w"].astype(np.float32)
        else:
            raise ValueError(f"expert graph {model.graph.name!r} has no weight for {proj}")
        out.append(np.ascontiguousarray(w_kn.T))
    return tuple(out)
