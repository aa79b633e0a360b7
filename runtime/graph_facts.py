"""Read the facts ``targets/rules.py`` judges from an expert graph: for every matrix product, how its
weight arrives (float initializer, Cast of one, DequantizeLinear of codes, or MatMulNBits) and the
types, block, axis and zero point involved. Types are propagated through the graph with the few
rules an expert graph needs (Cast sets the type, DequantizeLinear gives its scale's type, every
other node its first input's), so no shape inference of contrib ops is needed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dymoe.targets.rules import GraphFacts, WeightFacts

_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int2": 2, "uint2": 2}


def _type_name(elem: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem).name if elem not in _SPECIAL else _SPECIAL[elem]


_SPECIAL = {TensorProto.INT4: "int4", TensorProto.UINT4: "uint4",
            **({TensorProto.INT2: "int2", TensorProto.UINT2: "uint2"} if hasattr(TensorProto, "INT2") else {})}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _types(model: onnx.ModelProto) -> dict[str, str]:
    g = model.graph
    types = {t.name: _type_name(t.data_type) for t in g.initializer}
    types.update({v.name: _type_name(v.type.tensor_type.elem_type) for v in g.input})
    for node in g.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type == "Cast":
            t = _type_name(_attrs(node)["to"])
        elif node.op_type == "DequantizeLinear":
            t = types.get(node.input[1], "float32")
        else:
            t = types.get(node.input[0], "unknown") if node.input else "unknown"
        for out in node.output:
            types[out] = t
    return types


def graph_facts(model: onnx.ModelProto) -> GraphFacts:
    g = model.graph
    init = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    for o in g.output:
        consumers[o.name] = consumers.get(o.name, 0) + 1
    types = _types(model)
    weights = []
    for node in g.node:
        proj = node.name.split("_", 1)[0] or node.op_type
        if node.op_type == "MatMulNBits":
            a = _attrs(node)
            weights.append(WeightFacts(proj, "MatMulNBits", "uint8", int(a["bits"]), int(a["K"]), int(a["N"]),
                                       types.get(node.input[0], "unknown"), block_size=int(a["block_size"]),
                                       zero_point="nonzero" if len(node.input) > 3 and node.input[3] else "none",
                                       scale_type=types.get(node.input[2])))
        elif node.op_type == "MatMul":
            weights.append(_matmul_weight(proj, node, init, producer, consumers, types))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphFacts(opset=opset, domains=tuple(sorted({n.domain for n in g.node})), weights=tuple(weights))


def _matmul_weight(proj, node, init, producer, consumers, types) -> WeightFacts:
    act, b = types.get(node.input[0], "unknown"), node.input[1]
    if b in init:
        dims = list(init[b].dims)
        return WeightFacts(proj, "MatMul", types[b], None, dims[0], dims[-1], act)
    src = producer.get(b)
    if src is not None and src.op_type == "Cast" and src.input[0] in init:
        dims = list(init[src.input[0]].dims)
        return WeightFacts(proj, "MatMul", types[src.input[0]], None, dims[0], dims[-1], act, cast=True)
    if src is None or src.op_type != "DequantizeLinear":
        return WeightFacts(proj, "MatMul", types.get(b, "unknown"), None, 0, 0, act, constant=False, direct=False)
    a = _attrs(src)
    codes, scale = src.input[0], src.input[1]
    zp = src.input[2] if len(src.input) > 2 and src.input[2] else None
    kind = types.get(codes, "unknown")
    dims = list(init[codes].dims) if codes in init else [0, 0]
    rank = len(dims)
    axis = int(a.get("axis", 1))
    if axis < 0:
        axis += rank
    zero = "none"
    if zp is not None:
        zero = "zero" if zp in init and not np.any(numpy_helper.to_array(init[zp]).astype(np.int16)) else "nonzero"
    return WeightFacts(proj, "MatMul", kind, _BITS.get(kind), dims[0], dims[-1], act,
                       block_size=int(a["block_size"]) if "block_size" in a else None, axis=axis, rank=rank,
                       zero_point=zero, scale_type=types.get(scale),
                       constant=codes in init and scale in init and (zp is None or zp in init),
                       direct=consumers.get(b, 0) == 1)
