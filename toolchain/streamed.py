"""An ONNX model whose largest initializers stay numpy arrays until they are written.

A protobuf message owns a copy of every byte it holds, and serialising it makes another: an int8
embedding table of Qwen3-30B-A3B (151,936 x 2048, 297 MiB) cost its numpy codes, the bytes made
from them, the TensorProto's copy and the serialised model, four copies, 1.25 GiB at the export's
peak. A ``StreamedModel`` keeps such arrays out of the message: the file is written as pieces, the
model's own serialisation followed by each array's initializer framed by hand in protobuf's wire
format, its data straight from the array's memory. Parsed back, the file is exactly
:meth:`StreamedModel.materialize` (the arrays' initializers come after the model's own).

Wire format used (protobuf encoding spec): a length-delimited field is ``varint(field << 3 | 2)``,
``varint(length)``, then the bytes; ModelProto.graph is field 7, GraphProto.initializer field 5,
TensorProto.raw_data field 9. Fields may come in any order, so the graph goes last in the model,
and the arrays' initializers last in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def placeholder(array: np.ndarray, name: str) -> TensorProto:
    """The initializer of ``array`` without its data: name, type and shape."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    t.dims.extend(array.shape)
    return t


@dataclass
class StreamedModel:
    """``model`` (ONNX, without the arrays) plus ``arrays``: initializer name -> C-contiguous array."""

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def materialize(self) -> onnx.ModelProto:
        """The whole model as one message (it copies every array); ``model`` itself when there are none."""
        if not self.arrays:
            return self.model
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        out.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.arrays.items())
        return out

    def chunks(self) -> list:
        """The serialised model in pieces (bytes and memoryviews of the arrays), never joined."""
        if not self.arrays:
            return [self.model.SerializeToString()]
        head = onnx.ModelProto()
        head.CopyFrom(self.model)
        head.ClearField("graph")
        graph = self.model.graph.SerializeToString()
        framed = []
        for name, array in self.arrays.items():
            data = memoryview(np.ascontiguousarray(array)).cast("B")
            tensor = placeholder(array, name).SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(data.nbytes)
            framed += [_key(_GRAPH_INITIALIZER) + _varint(len(tensor) + data.nbytes) + tensor, data]
        graph_len = len(graph) + sum(memoryview(c).nbytes for c in framed)
        return [head.SerializeToString() + _key(_MODEL_GRAPH) + _varint(graph_len) + graph, *framed]
