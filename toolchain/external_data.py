"""Writing a graph with its largest tensors in ONNX external data.

A protobuf message cannot exceed 2 GiB, and a float32 embedding or LM head of a 151,936-token
vocabulary at hidden 2048 is 1.2 GB on its own. A graph whose initializers add up to more than
``limit`` bytes therefore keeps its small tensors inline and moves the largest ones, largest first,
into one data file beside it until what stays inline fits. The graph names that file by its
location relative to its own folder (as ONNX specifies); the manifest lists it with its sha256
(``backbone.external_data``), and the runtime hands ONNX Runtime the verified bytes itself, so
nothing is ever read through the name inside the graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto

from dymoe.bundle.fsutil import atomic_write_chunks
from dymoe.bundle.naming import external_data_path
from dymoe.bundle.paths import resolve

from .streamed import StreamedModel, placeholder

ALIGN = 64  # every tensor starts on a 64-byte boundary of the data file (aligned loads, if ever mapped)
# Smaller tensors always stay inline, whatever the limit: shapes and axes must be readable when ONNX
# Runtime infers shapes before it has the external data (onnx's own converter uses the same floor)
MIN_BYTES = 1024


def _size(t: TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else 0


def _point_outside(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def move_out(model: onnx.ModelProto | StreamedModel, location: str, limit: int) -> list:
    """Move the largest initializers of ``model`` (of at least :data:`MIN_BYTES`; raw data inline or a
    streamed model's arrays) into external data at ``location`` until at most ``limit`` bytes of those
    stay inline; returns the data file's pieces (empty: nothing moved)."""
    streamed = model if isinstance(model, StreamedModel) else StreamedModel(model)
    graph = streamed.model.graph
    inline = [(_size(t), t.name, t) for t in graph.initializer if _size(t) >= MIN_BYTES]
    inline += [(a.nbytes, name, None) for name, a in streamed.arrays.items() if a.nbytes >= MIN_BYTES]
    inline.sort(key=lambda c: c[0], reverse=True)
    left = sum(size for size, _, _ in inline)
    pieces: list = []
    offset = 0
    for size, name, t in inline:
        if left <= limit:
            break
        left -= size
        pad = -offset % ALIGN
        if pad:
            pieces.append(bytes(pad))
            offset += pad
        if t is None:  # a streamed array: written from its own memory, its initializer joins the graph
            array = streamed.arrays.pop(name)
            pieces.append(memoryview(array).cast("B"))
            t = placeholder(array, name)
            _point_outside(t, location, offset, size)
            graph.initializer.append(t)
        else:
            pieces.append(t.raw_data)
            _point_outside(t, location, offset, size)
        offset += size
    return pieces


def write_graph(out: Path, rel: str, model: onnx.ModelProto | StreamedModel, limit: int) -> dict[str, dict]:
    """Write ``model`` to ``out/rel`` atomically, its largest tensors in ``rel``'s external data file
    when they pass ``limit`` bytes; the journal entries of what was written (the data file first, so
    a graph is never on disk without it). A streamed model's arrays are written from their own memory."""
    streamed = model if isinstance(model, StreamedModel) else StreamedModel(model)
    data_rel = external_data_path(rel)
    pieces = move_out(streamed, data_rel.rpartition("/")[2], limit)
    written = {}
    if pieces:
        size, sha = atomic_write_chunks(resolve(out, data_rel), pieces)
        del pieces
        written[data_rel] = {"bytes": size, "sha256": sha}
    size, sha = atomic_write_chunks(resolve(out, rel), streamed.chunks())
    written[rel] = {"bytes": size, "sha256": sha}
    if len(written) > 1:
        written[rel]["external_data"] = [data_rel]
    return written
