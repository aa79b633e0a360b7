"""Vocabulary-sized matrices (the embedding table and the LM head, ``[V, H]``) read from the
checkpoint a slab of rows at a time.

Qwen3-30B-A3B's are 151,936 x 2048: 1.24 GB each as float32. Read whole, an int8 export held that
float32 table, hqq's contiguous copy of its transpose (another 1.24 GB) and the codes at once.
Quantization is per column of the ``[H, V]`` matrix (blocks run along H), so slabs of rows give
exactly the codes of the whole (a test pins it), and only one slab is ever float32.

V vocabulary rows, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .blockquant import QuantizedMatrix

SLAB_ROWS = 2048  # 2048 x 2048 float32 = 16 MiB (larger slabs are no faster and peak higher)


class VocabRows:
    """A ``[V, H]`` matrix whose rows ``a:b`` come from ``read(a, b)`` (float32), never all at once
    unless asked for as an array (``np.asarray(m, dtype)`` fills the result a slab at a time)."""

    ndim = 2

    def __init__(self, read: Callable[[int, int], np.ndarray], shape: tuple[int, ...],
                 slab_rows: int = SLAB_ROWS) -> None:
        if len(shape) != 2:
            raise ValueError(f"a vocabulary matrix is [V, H], got shape {tuple(shape)}")
        self._read, self.shape, self.slab_rows = read, (int(shape[0]), int(shape[1])), slab_rows

    def slabs(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(a, b, rows a:b as float32)`` covering the matrix in order."""
        for a in range(0, self.shape[0], self.slab_rows):
            b = min(self.shape[0], a + self.slab_rows)
            yield a, b, self._read(a, b)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype or np.float32)
        for a, b, x in self.slabs():
            out[a:b] = x
        return out


def quantize_vocab(m: np.ndarray | VocabRows, quantize: Callable[[np.ndarray], QuantizedMatrix],
                   rows_major: bool = False) -> QuantizedMatrix:
    """``quantize(m.T)`` for a ``[V, H]`` matrix (codes ``[H, V]``), a slab of rows at a time when ``m``
    is read lazily: the same codes, scales and zero points as quantizing the whole.

    ``rows_major``: lay the codes out as the table's own rows, ``q`` being the ``[H, V]`` view of a
    contiguous ``[V, H]`` array: what the embedding's Gather and MatMulNBits's ``[N, K]`` weight
    store, so the graph takes the codes without a vocabulary-sized transposed copy."""
    if not isinstance(m, VocabRows):
        return quantize(np.asarray(m).T)
    V = m.shape[0]
    q = scale = zero_point = None
    first: QuantizedMatrix | None = None
    for a, b, x in m.slabs():
        part = quantize(x.T)
        if first is None:
            first = part
            q = np.empty((V, part.K), dtype=part.q.dtype).T if rows_major else np.empty((part.K, V), part.q.dtype)
            scale = np.empty((part.scale.shape[0], V), dtype=part.scale.dtype)
            zero_point = np.empty((part.zero_point.shape[0], V), dtype=part.zero_point.dtype)
        q[:, a:b], scale[:, a:b], zero_point[:, a:b] = part.q, part.scale, part.zero_point
        del part, x
    assert first is not None, "a vocabulary matrix has rows"
    return QuantizedMatrix(q=q, scale=scale, zero_point=zero_point, bits=first.bits, block_size=first.block_size,
                           K=first.K, N=V)
