"""Blocked round-to-nearest (RTN) weight quantization, numpy only.

Dimension letters used throughout this module:

* ``K`` - input features (the reduction axis of ``x @ W``),
* ``N`` - output features,
* ``B`` - ``block_size``: number of consecutive K-rows sharing one scale/zero point,
* ``nb`` - number of blocks along K, ``ceil(K / B)``.

Weights are in MatMul "B" layout ``[K, N]`` (the transpose of a torch ``Linear.weight``),
and every block is one column-slice ``w[kb*B:(kb+1)*B, n]``.

Scheme (asymmetric min/max, the same one ONNX Runtime's MatMulNBits quantizer uses):

* per block and column: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``.  The range is
  widened to contain 0 so that 0.0 is exactly representable (its code is the zero point).
  This keeps exact zeros (pruned weights, padding) exact, and it means padding a short
  last block with zeros does not change its statistics.
* ``qmax = 2**bits - 1``, ``scale = (hi - lo) / qmax``; an all-zero block gets ``scale = 1``
  (any positive value works: its codes all equal the zero point 0 and dequantize to 0).
* ``zero_point = clip(round(-lo / scale), 0, qmax)``
* ``q = clip(round(w / scale) + zero_point, 0, qmax)``
* ``dequant = (q - zero_point) * scale``

Rounding is numpy's ``rint`` (round half to even).  Every element in range dequantizes
within ``scale / 2`` of its original value (up to float32 rounding of the division).

K need not be a multiple of B: the last block is then short.  Because 0 is always inside
the range, this is the same as padding K with zeros up to ``nb * B`` (what MatMulNBits and
blocked ``DequantizeLinear`` with ``scale.shape[0] == ceil(K / B)`` both assume), but
``QuantizedMatrix.q`` keeps exactly K rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)

# Quantize / dequantize in slabs of whole blocks so that the float32 temporaries stay
# around this many elements (16 MiB) regardless of the matrix size.
_CHUNK_ELEMS = 1 << 22


@dataclass
class QuantizedMatrix:
    """RTN-quantized ``[K, N]`` matrix with unpacked codes.

    q:          uint8 ``[K, N]``, codes in ``[0, 2**bits - 1]``.
    scale:      float32 ``[nb, N]``.
    zero_point: uint8 ``[nb, N]``.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    block_size: int
    K: int
    N: int

    @property
    def n_blocks(self) -> int:
        return self.scale.shape[0]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def block_slabs(K: int, block_size: int, N: int):
    """Yield ``(row_start, row_stop, block_start, block_stop)`` slabs covering K.

    A slab is either several full blocks or, at the end, the single short block, so that
    ``rows.reshape(n_blocks_in_slab, rows_per_block, N)`` is always valid.
    """
    nfull = K // block_size
    per_slab = max(1, _CHUNK_ELEMS // max(1, block_size * N))
    for b0 in range(0, nfull, per_slab):
        b1 = min(nfull, b0 + per_slab)
        yield b0 * block_size, b1 * block_size, b0, b1
    if K % block_size:
        yield nfull * block_size, K, nfull, nfull + 1


def minmax_params(lo: np.ndarray, hi: np.ndarray, qmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float32, integer-valued) for the range ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    s = ((hi - lo) / np.float32(qmax)).astype(np.float32, copy=False)
    s[s == 0] = 1.0  # all-zero block (lo == hi == 0): code 0 == zero point
    zp = np.clip(np.rint(-lo / s), 0.0, qmax).astype(np.float32, copy=False)
    return s, zp


def round_codes(wb: np.ndarray, s: np.ndarray, zp: np.ndarray, qmax: float) -> np.ndarray:
    """Float32 codes ``clip(rint(w / s) + zp, 0, qmax)`` of blocks ``wb [nblk, B, N]`` given
    ``s, zp [nblk, N]``; one slab-sized temporary, updated in place."""
    t = np.divide(wb, s[:, None, :], dtype=np.float32)
    np.rint(t, out=t)
    t += zp[:, None, :]
    np.clip(t, 0.0, qmax, out=t)
    return t


def quantize_rtn(w: np.ndarray, bits: int, block_size: int) -> QuantizedMatrix:
    """Quantize ``w`` (``[K, N]``, float) along K in blocks of ``block_size``.

    ``w`` may be a non-contiguous view (e.g. ``linear_weight.T``); it is never copied
    as a whole.  Peak extra memory is the uint8 result plus one slab temporary.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] matrix, got shape {w.shape}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    K, N = w.shape
    nb = -(-K // block_size)
    qmax = float((1 << bits) - 1)

    q = np.empty((K, N), dtype=np.uint8)
    scale = np.empty((nb, N), dtype=np.float32)
    zero_point = np.empty((nb, N), dtype=np.uint8)

    for r0, r1, b0, b1 in block_slabs(K, block_size, N):
        rows = r1 - r0
        nblk = b1 - b0
        wb = w[r0:r1].reshape(nblk, rows // nblk, N)  # splitting one axis: still a view
        lo = np.minimum(wb.min(axis=1), 0.0).astype(np.float32, copy=False)
        hi = np.maximum(wb.max(axis=1), 0.0).astype(np.float32, copy=False)
        s, zp = minmax_params(lo, hi, qmax)
        q[r0:r1] = round_codes(wb, s, zp, qmax).reshape(rows, N)  # float -> uint8 (exact integers)

        scale[b0:b1] = s
        zero_point[b0:b1] = zp
    return QuantizedMatrix(q=q, scale=scale, zero_point=zero_point, bits=bits,
                           block_size=block_size, K=K, N=N)


def dequantize(qm: QuantizedMatrix) -> np.ndarray:
    """Numpy reference dequantization: float32 ``[K, N]`` = ``(q - zero_point) * scale``.

    Computed as ``float(q - zp) * scale`` in float32, which is bit-identical to ONNX
    ``DequantizeLinear``.
    """
    K, N, B = qm.K, qm.N, qm.block_size
    out = np.empty((K, N), dtype=np.float32)
    for r0, r1, b0, b1 in block_slabs(K, B, N):
        nblk = b1 - b0
        ob = out[r0:r1].reshape(nblk, (r1 - r0) // nblk, N)
        np.subtract(qm.q[r0:r1].reshape(ob.shape), qm.zero_point[b0:b1, None, :],
                    out=ob, dtype=np.float32)
        ob *= qm.scale[b0:b1, None, :]
    return out


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide codes along the last axis, low bits first.

    Element ``j`` of a row goes to byte ``j // (8 // bits)`` at bit offset
    ``(j % (8 // bits)) * bits``.  The last axis is zero-padded to a multiple of
    ``8 // bits``.  This is the layout of ONNX INT4/UINT4 raw data (on a flattened tensor)
    and of ORT MatMulNBits ``B`` / ``zero_points``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    L = codes.shape[-1]
    pad = (-L) % per
    if pad:
        codes = np.concatenate(
            [codes, np.zeros(codes.shape[:-1] + (pad,), dtype=np.uint8)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + ((L + pad) // per, per))
    packed = grouped[..., 0].copy()
    for j in range(1, per):
        packed |= grouped[..., j] << np.uint8(j * bits)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: unpack the last axis back to ``length`` codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :length].copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(j * bits)) & mask for j in range(per)]
    out = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
    return out[..., :length]
