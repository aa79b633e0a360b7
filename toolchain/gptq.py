"""GPTQ: quantization that compensates each row's rounding error on the rows still to come, using
the layer's real inputs (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2023). Numpy only; output identical in form to ``quantize_rtn``.

Dimension letters as in ``quantize.py``: weights ``[K, N]`` (``y = x @ W``), ``B`` the block along K
sharing one scale / zero point, ``G`` the lazy-update group of rows (a multiple of ``B``).

Given the inputs' second moment ``Hs = X^T X [K, K]``, the output error of a weight error ``D`` is
``tr(D^T Hs D)``. GPTQ quantizes the K rows in order; after row k it spreads the row's error over
the rows not yet quantized with the inverse-Hessian row (optimal brain surgeon update), so that
correlated inputs absorb it. Row k uses the scale and zero point of its block, fitted (with the
data-free optimiser of ``hqq.py``) on the block's *updated* weights when its first row is reached.
``damp`` adds that fraction of the mean diagonal to ``Hs`` (inputs never seen or too few tokens
make ``Hs`` singular); an input channel that was always zero only gets the damping, so its weights
are quantized as the data-free quantizer would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .blockquant import SUPPORTED_BITS, QuantizedMatrix, block_slabs, round_codes
from .hqq import HqqOptions, fit_params

LAZY_ROWS = 128  # rows updated together with one matrix product (GPTQ's "lazy batch")


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01  # fraction of mean(diag(X^T X)) added to the diagonal
    params: HqqOptions = field(default_factory=HqqOptions)  # how each block's scale / zero point is fitted
    # Quantize the rows with the largest input energy first (GPTQ's "act order"), so the rows that
    # matter most are rounded before accumulated corrections reach them. Blocks keep contiguous
    # rows (the storage format needs it), so their parameters are fitted up front on the original
    # weights ("static groups") instead of on the updated ones.
    act_order: bool = False


def inverse_factor(hs: np.ndarray, damp: float = GptqOptions.damp) -> np.ndarray:
    """Upper-triangular ``U`` with ``U^T U = (Hs + damp * mean(diag) * I)^-1``, float32 like the
    reference implementation (the damping grows tenfold while the matrix is not positive definite in
    floating point).

    One Cholesky and one triangular inverse: with ``P`` the reversal permutation and
    ``P Hs P = M M^T``, ``Hs^-1 = (P M^-1 P)^T (P M^-1 P)`` and ``P M^-1 P`` is upper triangular.
    Peak memory: about three ``K x K`` float32 matrices."""
    h = np.array(hs[::-1, ::-1], dtype=np.float32)  # P Hs P
    diag = np.einsum("ii->i", h)  # a view: edits below change h
    diag[diag <= 0] = 1.0  # inputs never seen: only the damping acts on them
    base = float(diag.mean())
    added = 0.0
    for attempt in range(6):
        lam = damp * (10.0 ** attempt) * base
        diag += lam - added
        added = lam
        try:
            lower = np.linalg.cholesky(h)
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise ValueError("GPTQ: X^T X is not positive definite even with heavy damping")
    del h, diag
    inverse = _inverse_lower(lower)
    del lower
    return inverse[::-1, ::-1]  # a view: the callers read rows and small blocks of it


def _inverse_lower(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """Inverse of a lower-triangular matrix by blocks, ``[[A, 0], [C, D]]^-1 = [[A^-1, 0],
    [-D^-1 C A^-1, D^-1]]``: about n^3 / 3 flops in matrix products, where a general inverse (numpy
    has no triangular one) costs 8x more. The result is exactly lower triangular."""
    n = lower.shape[0]
    if n <= leaf:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    out = np.zeros_like(lower)
    a_inv = _inverse_lower(lower[:m, :m], leaf)
    d_inv = _inverse_lower(lower[m:, m:], leaf)
    out[:m, :m] = a_inv
    out[m:, m:] = d_inv
    out[m:, :m] = -(d_inv @ (lower[m:, :m] @ a_inv))
    return out


def quantize_gptq(w: np.ndarray, bits: int, block_size: int, hessian: np.ndarray,
                  options: GptqOptions = GptqOptions(), factor: np.ndarray | None = None) -> QuantizedMatrix:
    """Quantize ``w [K, N]`` given ``hessian = X^T X [K, K]`` of its inputs ``X [T, K]``.

    ``factor`` may pass ``inverse_factor(hessian, options.damp)`` when several matrices share the
    inputs (an expert's gate and up projections, at every precision): it is the costly part."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    K, N = w.shape
    if hessian.shape != (K, K):
        raise ValueError(f"hessian must be [{K}, {K}] for a [{K}, {N}] weight, got {hessian.shape}")
    qmax = float((1 << bits) - 1)
    B = block_size
    nb = -(-K // B)
    G = B * max(1, LAZY_ROWS // B)
    w = np.asarray(w, dtype=np.float32)
    scale = np.empty((nb, N), dtype=np.float32)
    zero_point = np.empty((nb, N), dtype=np.float32)  # integer-valued; stored as uint8 at the end
    if options.act_order:
        # static groups: every block's parameters from the original weights, then the rows by
        # decreasing input energy
        for r0, r1, b0, b1 in block_slabs(K, B, N):
            nblk = b1 - b0
            scale[b0:b1], zero_point[b0:b1] = fit_params(w[r0:r1].reshape(nblk, (r1 - r0) // nblk, N), bits,
                                                         options.params)
        order = np.argsort(-np.diagonal(hessian), kind="stable")
        u = inverse_factor(np.asarray(hessian)[np.ix_(order, order)], options.damp)
        W = w[order]  # a copy, in visiting order, updated in place as errors are spread
    else:
        order = np.arange(K)
        u = inverse_factor(hessian, options.damp) if factor is None else factor
        W = np.array(w, order="C")  # a copy with contiguous rows (w may be a transposed view)

    q = np.empty((K, N), dtype=np.uint8)
    for g0 in range(0, K, G):
        g1 = min(K, g0 + G)
        Wg = W[g0:g1]  # view: updated row by row below
        err = np.empty((g1 - g0, N), dtype=np.float32)
        for i in range(g1 - g0):
            k = g0 + i
            row = order[k]
            b = row // B
            if not options.act_order and row % B == 0:  # fitted on the block's updated rows
                s, z = fit_params(Wg[i:i + B][None], bits, options.params)
                scale[b], zero_point[b] = s[0], z[0]
            code = round_codes(Wg[i][None, None], scale[b][None], zero_point[b][None], qmax)[0, 0]
            q[row] = code
            err[i] = e = (Wg[i] - (code - zero_point[b]) * scale[b]) / u[k, k]
            if i + 1 < g1 - g0:
                Wg[i + 1:] -= np.outer(u[k, k + 1:g1], e)
        if g1 < K:
            W[g1:] -= u[g0:g1, g1:].T @ err
    return QuantizedMatrix(q=q, scale=scale, zero_point=zero_point.astype(np.uint8), bits=bits, block_size=B,
                           K=K, N=N)
