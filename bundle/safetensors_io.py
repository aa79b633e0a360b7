"""A torch-free safetensors reader that loads one tensor (or one slice of one) at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then the raw bytes.
Reading by offsets keeps memory at one tensor and lets us read bf16, which numpy cannot name:
bf16 is the top half of a float32, so widening is a 16-bit shift.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dymoe.bundle.errors import CheckpointError

_DTYPES = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """One ``.safetensors`` file, validated on open (header, offsets, file size)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"missing safetensors file: {self.path}",
                "check the checkpoint folder is complete (re-download the missing shard)",
            )
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise self._corrupt(f"header length {n} does not fit in a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._corrupt(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"tensor {name!r} has a malformed header entry") from None
            if not isinstance(entry["shape"], list) or not all(_is_count(d) for d in shape) \
                    or not (_is_count(b) and _is_count(e)):
                raise self._corrupt(f"tensor {name!r} has a malformed header entry (shape or offsets)")
            if dtype not in _DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {self.path.name} has dtype {dtype}; dymoe reads "
                    f"{', '.join(sorted(_DTYPES))}",
                    "convert the checkpoint to bf16, fp16 or fp32 first",
                )
            info = TensorInfo(name, dtype, shape, base + b, base + e)
            if info.end - info.begin != info.numel * _DTYPES[dtype][1] or b > e:
                raise self._corrupt(f"tensor {name!r} byte range does not match its shape")
            if info.end > size:
                raise self._corrupt(
                    f"tensor {name!r} ends at byte {info.end} but the file has {size} bytes "
                    "(truncated?)"
                )
            self.tensors[name] = info

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"corrupt safetensors file {self.path}: {why}",
            "re-download or re-save this file; the export cannot continue",
        )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read tensor ``name`` as float32; optionally only ``[index]`` and ``[..., rows]``.

        ``index`` selects along the first axis (an expert of a fused ``[E, ...]`` tensor) and
        ``rows`` a contiguous range along the next axis, so a fused slice is one contiguous read.
        """
        info = self.tensors[name]
        np_dtype, width = _DTYPES[info.dtype]
        shape = list(info.shape)
        offset = info.begin
        if index is not None and not (shape and 0 <= index < shape[0]):
            raise IndexError(f"index {index} out of range for {name} {info.shape}")
        if rows is not None and not (len(shape) > (index is not None)
                                     and 0 <= rows[0] <= rows[1] <= shape[index is not None]):
            raise IndexError(f"rows {rows} out of range for {name} {info.shape}")
        if index is not None:
            inner = info.numel // shape[0]
            offset += index * inner * width
            shape = shape[1:]
        if rows is not None:
            r0, r1 = rows
            row_elems = 1
            for d in shape[1:]:
                row_elems *= d
            offset += r0 * row_elems * width
            shape = [r1 - r0, *shape[1:]]
        count = 1
        for d in shape:
            count *= d
        out = np.empty(count, dtype=np.float32)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if not _read_into(f, out, np_dtype, info.dtype == "BF16"):
                raise self._corrupt(f"short read of tensor {name!r}")
        return out.reshape(shape)


# Elements converted per read: the raw chunk and its float32 result stay in cache, and a tensor
# never sits in memory twice (a 150k x 2048 embedding is 1.2 GB as float32, 0.6 GB as bf16).
_READ_CHUNK = 1 << 18


def _read_into(f, out: np.ndarray, dtype: np.dtype, bf16: bool) -> bool:
    """Fill float32 ``out`` with the next ``out.size`` elements of ``dtype`` from ``f``, chunk by
    chunk; False on a short read. bf16 is the top half of a float32: widen, then shift."""
    if dtype == np.dtype("<f4") and np.little_endian:  # the bytes are the result: no conversion
        return _fill(f, memoryview(out).cast("B"))
    buf = np.empty(min(_READ_CHUNK, out.size), dtype=dtype)
    as_int = out.view(np.uint32)
    for i in range(0, out.size, _READ_CHUNK):
        n = min(_READ_CHUNK, out.size - i)
        if not _fill(f, memoryview(buf[:n]).cast("B")):
            return False
        if bf16:
            as_int[i:i + n] = buf[:n]
            as_int[i:i + n] <<= 16
        else:
            out[i:i + n] = buf[:n]
    return True


def _fill(f, view: memoryview) -> bool:
    """Read exactly ``len(view)`` bytes into ``view`` (``readinto`` may return fewer); False at EOF."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            return False
        done += n
    return True


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write float tensors (as F32, F16 or BF16) — used for synthetic checkpoints and tests.

    Streams tensor by tensor, so a multi-GB synthetic checkpoint never sits in memory twice.
    """
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(tensors, dtype))
        for t in tensors.values():
            f.write(_encode(np.asarray(t), dtype))
    os.replace(tmp, path)


def encode_safetensors(tensors: dict[str, np.ndarray], dtype: str = "F32") -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (as F32, F16 or BF16), tensors in the
    order given: for files a caller writes atomically and checksums itself."""
    # one copy of the data: the header and each tensor's own buffer are joined once
    return b"".join([_header(tensors, dtype), *(_encode(np.asarray(t), dtype) for t in tensors.values())])


def _header(tensors: dict[str, np.ndarray], dtype: str) -> bytes:
    """The 8-byte header length and the JSON header, padded so the data start 8-byte aligned."""
    header: dict[str, dict] = {}
    offset = 0
    width = _DTYPES[dtype][1]
    for name, t in tensors.items():
        nbytes = int(np.prod(np.shape(t))) * width
        header[name] = {"dtype": dtype, "shape": list(np.shape(t)), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _encode(t: np.ndarray, dtype: str) -> np.ndarray:
    """``t``'s little-endian bytes in ``dtype``, as a flat uint8 array (no copy when ``t`` already is)."""
    if dtype == "F32":
        return np.ascontiguousarray(t, dtype="<f4").reshape(-1).view(np.uint8)
    if dtype == "F16":
        return np.ascontiguousarray(t, dtype="<f2").reshape(-1).view(np.uint8)
    # bf16: round to nearest even on the dropped 16 bits; NaN stays a (quiet) NaN, as in torch
    f = np.ascontiguousarray(t, dtype="<f4")
    u = f.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    u = np.where(np.isnan(f), (f.view(np.uint32) >> 16) | 0x0040, u)
    return u.astype("<u2").reshape(-1).view(np.uint8)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
