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

from dymoe.bundle.fsutil import atomic_write_bytes, atomic_write_chunks
from dymoe.bundle.naming import external_data_path
from dymoe.bundle.paths import resolve

ALIGN = 64  # every tensor starts on a 64-byte boundary of the data file (aligned loads, if ever mapped)
# Smaller tensors always stay inline, whatever the limit: shapes and axes must be readable when ONNX
# Runtime infers shapes before it has the external data (onnx's own converter uses the same floor)
MIN_BYTES = 1024


def _size(t: TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else 0


def move_out(model: onnx.ModelProto, location: str, limit: int) -> list[bytes]:
    """Move the largest raw initializers of ``model`` (of at least :data:`MIN_BYTES`) into external data
    at ``location`` until at most ``limit`` bytes of those stay inline; returns the data file's pieces
    (empty: nothing moved)."""
    inits = sorted((t for t in model.graph.initializer if _size(t) >= MIN_BYTES), key=_size, reverse=True)
    inline = sum(_size(t) for t in inits)
    pieces: list[bytes] = []
    offset = 0
    for t in inits:
        if inline <= limit:
            break
        data = t.raw_data
        inline -= len(data)
        pad = -offset % ALIGN
        if pad:
            pieces.append(bytes(pad))
            offset += pad
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        pieces.append(data)
        offset += len(data)
    return pieces


def write_graph(out: Path, rel: str, model: onnx.ModelProto, limit: int) -> dict[str, dict]:
    """Write ``model`` to ``out/rel`` atomically, its largest tensors in ``rel``'s external data file
    when they pass ``limit`` bytes; the journal entries of what was written (the data file first, so
    a graph is never on disk without it)."""
    data_rel = external_data_path(rel)
    pieces = move_out(model, data_rel.rpartition("/")[2], limit)
    written = {}
    if pieces:
        size, sha = atomic_write_chunks(resolve(out, data_rel), pieces)
        del pieces
        written[data_rel] = {"bytes": size, "sha256": sha}
    data = model.SerializeToString()
    written[rel] = {"bytes": len(data), "sha256": atomic_write_bytes(resolve(out, rel), data)}
    if len(written) > 1:
        written[rel]["external_data"] = [data_rel]
    return written
