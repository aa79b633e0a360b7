"""A thin helper over ``onnx.helper`` for building graphs node by node with readable code."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .streamed import StreamedModel, placeholder

OPSET = 21  # blocked DequantizeLinear and (U)INT4 need 21
IR_VERSION = 10
# Initializers this large stay numpy arrays until the model is written (see streamed.py): only the
# vocabulary-sized embedding table and LM head of a large model reach it
DEFER_BYTES = 64 << 20


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._ids = itertools.count()
        self._consts: dict[tuple, str] = {}
        self.deferred: dict[str, np.ndarray] = {}  # name -> array, for initializers of DEFER_BYTES and up

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape: list) -> str:
        if value != name:
            self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """The initializer ``name`` of ``array`` to append to ``inits``: the array itself is kept aside
        (data-less placeholder) when it has :data:`DEFER_BYTES` or more."""
        array = np.ascontiguousarray(array)
        if array.nbytes < DEFER_BYTES:
            return numpy_helper.from_array(array, name)
        self.deferred[name] = array
        return placeholder(array, name)

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.tensor(array, name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant, shared by value (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], out: str | None = None, domain: str = "", **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self.fresh(f"n_{op_type}"), domain=domain, **attrs)
        )
        return out

    def ops(self, op_type: str, inputs: list[str], n: int, domain: str = "", **attrs) -> list[str]:
        """A node with ``n`` outputs (TopK, Split)."""
        outs = [self.fresh(op_type.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"n_{op_type}"), domain=domain,
                                           **attrs))
        return outs

    def model(self, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        return self.streamed(extra_opsets).materialize()

    def streamed(self, extra_opsets: dict[str, int] | None = None) -> StreamedModel:
        """The model with its deferred arrays still aside, to be written without copying them."""
        inits = [t for t in self.inits if t.name not in self.deferred]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        opsets = [helper.make_opsetid("", OPSET)]
        opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="dymoe")
        model.ir_version = IR_VERSION
        return StreamedModel(model, dict(self.deferred))

    # --- common blocks -------------------------------------------------------------------

    def matmul_t(self, x: str, weight: np.ndarray, name: str) -> str:
        """``x @ weight.T`` for a torch-Linear weight ``[out, in]`` (stored as ``[in, out]``)."""
        return self.op("MatMul", [x, self.init(name, np.ascontiguousarray(weight.T, dtype=np.float32))])

    def linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """A torch ``Linear``: ``x @ weight.T (+ bias)``."""
        y = self.matmul_t(x, weight, name)
        return y if bias is None else self.op("Add", [y, self.init(f"{name}.bias", np.asarray(bias, np.float32))])

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        """RMSNorm over the last axis, in the Pow/ReduceMean/Div form ORT fuses into one kernel."""
        sq = self.op("Pow", [x, self.const(2.0, np.float32)])
        mean = self.op("ReduceMean", [sq, self.const([-1])], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [mean, self.const(eps, np.float32)])])
        normed = self.op("Div", [x, std])
        return self.op("Mul", [normed, self.init(name, weight.astype(np.float32))])

    def swiglu(self, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, prefix: str) -> str:
        g = self.matmul_t(x, gate, f"{prefix}.gate")
        act = self.op("Mul", [g, self.op("Sigmoid", [g])])
        h = self.op("Mul", [act, self.matmul_t(x, up, f"{prefix}.up")])
        return self.matmul_t(h, down, f"{prefix}.down")


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
