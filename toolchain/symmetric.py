"""Symmetric signed INT4 with fp16 scales: the weight form TensorRT's INT4 weight-only GEMM takes.

Dimension letters as in ``blockquant.py``: ``K`` in, ``N`` out, ``B`` block along K, ``nb`` blocks;
a slab of blocks is ``[nblk, B, N]``.

Per block and column one scale ``s`` (stored as fp16) and no zero point:
``w ~ s * c`` with signed codes ``c = clip(rint(w / s), -8, 7)``. The codes are kept in the
repository's usual :class:`QuantizedMatrix` (unsigned ``q = c + 8``, ``zero_point = 8``), so the
error statistics, ``dequantize`` and the tests need nothing new; the graph writes ``q - 8`` as INT4.

The scale is rounded to fp16 *before* the codes are chosen, so the codes are the best ones for
the scale actually stored. ``DequantizeLinear`` returns its product in the scale's type, so the
graph multiplies by ``fp16(c * s)``: one more rounding of at most 2^-11 of the weight, far below
the INT4 step (:func:`effective` gives exactly these weights).

* ``rtn``: ``s = max|w| / 7`` (the range [-7, 7] covers the block; -8 is only reached by rounding).
* ``hqq`` (data-free, like ``hqq.py``'s range search for the asymmetric form): ``max|w|`` shrunk by
  each factor of a grid, each (block, column) keeping the factor with the smallest
  salience-weighted squared error ``sum (1 + 4 w^2 / mean(w^2)) (w - s c)^2`` (RTN's own scale is
  a candidate, so it is never worse than RTN under that error), then the unbiasing rescale
  ``s *= <w, w> / <s c, w>`` with the codes fixed (a least-squares fit shrinks every expert's
  output, and that bias costs more through the residual stream than the error it saves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blockquant import QuantizedMatrix, block_slabs, dequantize

BITS = 4
OFFSET = 8  # unsigned code = signed code + 8 (the "zero point" of QuantizedMatrix)
QMIN, QMAX = -8, 7
FP16_TINY = np.float32(np.finfo(np.float16).tiny)  # smallest normal fp16: scales never round to 0


@dataclass(frozen=True)
class SymOptions:
    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    salience: float = 4.0  # weight of w^2 / mean(w^2) in each element's error weight (as hqq.py)
    unbiased: bool = True


def fp16_scale(s: np.ndarray) -> np.ndarray:
    """``s`` rounded to fp16 and back (float32), never zero or infinite: all-zero blocks get 1."""
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    s = np.clip(s, FP16_TINY, np.float32(np.finfo(np.float16).max))
    return s.astype(np.float16).astype(np.float32)


def codes(wb: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Signed float32 codes ``clip(rint(w / s), -8, 7)`` of blocks ``wb [nblk, B, N]`` for ``s [nblk, N]``."""
    c = np.divide(wb, s[:, None, :], dtype=np.float32)
    np.rint(c, out=c)
    np.clip(c, QMIN, QMAX, out=c)
    return c


def _weighted_error(wb: np.ndarray, s: np.ndarray, c: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    d = c * s[:, None, :]
    d -= wb
    np.square(d, out=d)
    if weight is not None:
        d *= weight
    return d.sum(axis=1)


def _salience(wb: np.ndarray, salience: float) -> np.ndarray | None:
    if salience == 0:
        return None
    w2 = np.square(wb)
    mean = w2.mean(axis=1, keepdims=True)
    mean[mean == 0] = 1.0
    return 1.0 + np.float32(salience) * w2 / mean


def fit(wb: np.ndarray, how: str, options: SymOptions = SymOptions()) -> tuple[np.ndarray, np.ndarray]:
    """fp16-representable scales ``[nblk, N]`` (float32) and signed codes ``[nblk, B, N]`` for ``wb``."""
    wb = np.asarray(wb, dtype=np.float32)
    amax = np.abs(wb).max(axis=1)
    best_s = fp16_scale(amax / np.float32(-QMIN - 1))
    if how == "rtn":
        return best_s, codes(wb, best_s)
    if how != "hqq":
        raise ValueError(f"symmetric int4 quantizes with rtn or hqq, not {how!r}")
    weight = _salience(wb, options.salience)
    best_err = _weighted_error(wb, best_s, codes(wb, best_s), weight)
    for shrink in options.grid:
        if shrink == 1.0:
            continue
        s = fp16_scale(amax * np.float32(shrink) / np.float32(-QMIN - 1))
        err = _weighted_error(wb, s, codes(wb, s), weight)
        better = err < best_err
        best_err[better] = err[better]
        best_s[better] = s[better]
    c = codes(wb, best_s)
    if options.unbiased:
        what = c * best_s[:, None, :]
        energy = np.einsum("bkn,bkn->bn", wb, wb, dtype=np.float64)
        overlap = np.einsum("bkn,bkn->bn", what, wb, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where((overlap > 0) & (energy > 0), energy / overlap, 1.0)
        best_s = fp16_scale((best_s * factor).astype(np.float32))  # codes fixed; the scale is stored in fp16
    return best_s, c


def quantize_sym_int4(w: np.ndarray, block_size: int, how: str = "hqq",
                      options: SymOptions = SymOptions()) -> QuantizedMatrix:
    """Quantize ``w [K, N]`` along K in blocks of ``block_size``: unsigned codes ``q = c + 8``,
    ``zero_point`` 8 everywhere, float32 scales that are exact fp16 values."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] matrix, got shape {w.shape}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    K, N = w.shape
    nb = -(-K // block_size)
    q = np.empty((K, N), dtype=np.uint8)
    scale = np.empty((nb, N), dtype=np.float32)
    for r0, r1, b0, b1 in block_slabs(K, block_size, N):
        nblk = b1 - b0
        wb = np.asarray(w[r0:r1], dtype=np.float32).reshape(nblk, (r1 - r0) // nblk, N)
        s, c = fit(wb, how, options)
        c += OFFSET
        q[r0:r1] = c.reshape(r1 - r0, N)
        scale[b0:b1] = s
    return QuantizedMatrix(q=q, scale=scale, zero_point=np.full((nb, N), OFFSET, dtype=np.uint8), bits=BITS,
                           block_size=block_size, K=K, N=N)


def effective(qm: QuantizedMatrix) -> np.ndarray:
    """float32 ``[K, N]`` weights the graph computes with: ``fp16(c * s)``, as DequantizeLinear with
    fp16 scales returns them (the float32 product is exact, so one rounding to fp16 matches it)."""
    return dequantize(qm).astype(np.float16).astype(np.float32)


def signed_codes(qm: QuantizedMatrix) -> np.ndarray:
    """int8 ``[K, N]`` signed codes of a symmetric matrix (what the graph stores as INT4)."""
    if qm.bits != BITS or not np.all(qm.zero_point == OFFSET):
        raise ValueError("not a symmetric int4 matrix (zero point must be 8 everywhere)")
    return qm.q.astype(np.int8) - np.int8(OFFSET)
