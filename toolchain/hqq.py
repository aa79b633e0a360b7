"""Data-free quantizer: optimised scales and zero points (HQQ-style), numpy only.

Same output as :func:`dymoe.toolchain.blockquant.quantize_rtn` - uint8 codes, float32 scale, integer
zero point per (block, column) - so the ONNX encodings (QDQ, MatMulNBits) do not change. Only the
choice of ``scale`` and ``zero_point`` differs. Dimension letters as in ``quantize.py``: ``K`` in,
``N`` out, ``B`` block along K, ``nb`` blocks; a slab of blocks is ``[nblk, B, N]``.

Round-to-nearest takes the block's min/max as the range, so one large weight stretches the step
for all 32 and most of them round to the same few codes. This quantizer instead minimises the
block's *salience-weighted* squared error ``sum c (w - s (q - z))^2`` with
``c = 1 + salience * w^2 / mean_block(w^2)``:

1. Range search: the min/max range shrunk by each factor of ``grid`` (clipping the extremes);
   each (block, column) keeps the factor with the smallest squared error.
2. Optional half-quadratic refinement (``iters``; Badri & Shaji, "Half-Quadratic Quantization of
   Large Machine Learning Models", 2023): alternately quantize, split the residual into a sparse outlier part
   ``e = shrink_lp(residual)`` (the proximal step of an l_p norm, p < 1, taken in units of the
   step so it does not depend on the weights' scale) and refit ``s`` and ``z`` by least squares to
   ``w - e``. HQQ keeps ``z`` fractional; here it is rounded to an integer code (what
   DequantizeLinear and MatMulNBits store) and ``s`` is refitted for that integer ``z``.
3. Every candidate is scored by that error and the best is kept per (block, column), with RTN's
   own parameters among the candidates, so the range search never picks worse than RTN block by
   block (under that error; step 4 then trades a little of it for no bias).
4. Unbiasing: with its codes fixed, each (block, column)'s scale is multiplied by
   ``<w, w> / <w_q, w>`` so that ``<w_q, w> = <w, w>``. A least-squares fit shrinks:
   ``||w_q|| < ||w||``, and every expert's output comes out a little too small; through the
   residual stream of every layer that bias costs more than the error it saves.

Why the salience weight: plain squared error (``salience=0``, the output error for white inputs)
clips a block's largest weights, and on a trained model's real routed inputs that *raised* the
output error at int2 (demo model: 0.34 vs RTN's 0.28 mean relative error, perplexity +5 % instead
of +0.7 %): large weights carry the signal. Weighting each weight's error by its own magnitude
(``salience=4``) gave 0.257 vs RTN's 0.283 at int2 and 0.054 vs 0.056 at int4 on the same tokens
(every other expert of the demo), and on a Gaussian probe 0.446 vs 0.548 and 0.097 vs 0.101.
Yet the held-out perplexity with every expert at int2 was worse than RTN's (+1.0 % vs +0.6 % over
fp32, 40 windows) until step 4 (+0.4 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blockquant import SUPPORTED_BITS, QuantizedMatrix, block_slabs, minmax_params, round_codes


@dataclass(frozen=True)
class HqqOptions:
    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    # Half-quadratic iterations after the range search. Off by default: on the demo model 20 of them
    # changed held-out perplexity by under 0.05 % (int4 and int2) for 2.5-7x the time.
    iters: int = 0
    lp: float = 0.7  # p of the l_p norm on the residual (HQQ's default)
    salience: float = 4.0  # weight of w^2 / mean(w^2) in each element's error weight (0: plain squared error)
    beta: float = 10.0  # initial penalty weight of the half-quadratic split (in step units)
    kappa: float = 1.01  # beta grows by this factor per iteration
    tol: float = 1e-3  # stop once an iteration removes less than this fraction of the remaining error
    unbiased: bool = True  # step 4: rescale so that <w_q, w> = <w, w> per (block, column)


def _sq_error(wb: np.ndarray, s: np.ndarray, z: np.ndarray, q: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """Weighted squared error per (block, column): ``sum_B c (s (q - z) - w)^2``, ``[nblk, N]``.

    Consumes ``q`` (its buffer is reused): callers pass fresh codes."""
    d = q
    d -= z[:, None, :]
    d *= s[:, None, :]
    d -= wb
    np.square(d, out=d)
    if c is not None:
        d *= c
    return d.sum(axis=1)  # float32 over one block of B elements: ample precision for comparisons


def _salience(wb: np.ndarray, salience: float) -> np.ndarray | None:
    """Per-element error weights ``1 + salience * w^2 / mean_block(w^2)`` (None: all ones)."""
    if salience == 0:
        return None
    w2 = np.square(wb)
    mean = w2.mean(axis=1, keepdims=True)
    mean[mean == 0] = 1.0
    w2 *= np.float32(salience) / mean
    w2 += 1.0
    return w2


def fit_params(wb: np.ndarray, bits: int, options: HqqOptions = HqqOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point (as float32) ``[nblk, N]`` for blocks ``wb [nblk, B, N]``."""
    s, z, _ = fit(wb, bits, options)
    return s, z


def fit(wb: np.ndarray, bits: int, options: HqqOptions = HqqOptions()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_params` plus the float32 codes ``[nblk, B, N]`` they were fitted with."""
    qmax = float((1 << bits) - 1)
    wb = np.asarray(wb, dtype=np.float32)
    lo0 = np.minimum(wb.min(axis=1), 0.0)
    hi0 = np.maximum(wb.max(axis=1), 0.0)
    weight = _salience(wb, options.salience)
    best_s, best_z = minmax_params(lo0, hi0, qmax)  # RTN's own parameters: never worse than RTN
    best_err = _sq_error(wb, best_s, best_z, round_codes(wb, best_s, best_z, qmax), weight)

    def consider(s: np.ndarray, z: np.ndarray, q: np.ndarray | None = None) -> float:
        """Keep the better parameters per (block, column); return the total error removed."""
        err = _sq_error(wb, s, z, round_codes(wb, s, z, qmax) if q is None else q.copy(), weight)
        better = err < best_err
        gain = float((best_err[better] - err[better]).sum())
        best_err[better] = err[better]
        best_s[better] = s[better]
        best_z[better] = z[better]
        return gain

    for shrink in options.grid:
        if shrink != 1.0:
            consider(*minmax_params(lo0 * np.float32(shrink), hi0 * np.float32(shrink), qmax))

    s, z = best_s.copy(), best_z.copy()
    q = round_codes(wb, s, z, qmax) if options.iters else None
    beta = options.beta
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(options.iters):
            u = wb - (q - z[:, None, :]) * s[:, None, :]  # residual...
            u /= s[:, None, :]  # ...in units of the step
            mag = np.abs(u)
            shrunk = np.maximum(mag - np.power(mag, options.lp - 1.0) / np.float32(beta), 0.0)
            target = wb - np.sign(u) * shrunk * s[:, None, :]  # w minus its sparse outlier part
            del u, mag, shrunk
            # weighted least squares target ~ a q + b per (block, column), then z = -b / a rounded
            cw = np.ones_like(q) if weight is None else weight
            total = cw.sum(axis=1)
            qm = np.einsum("bkn,bkn->bn", cw, q) / total
            tm = np.einsum("bkn,bkn->bn", cw, target) / total
            qc = q - qm[:, None, :]
            qc_w = qc * cw
            a = np.einsum("bkn,bkn->bn", qc_w, target - tm[:, None, :]) / np.einsum("bkn,bkn->bn", qc_w, qc)
            del qc, qc_w
            ok = np.isfinite(a) & (a > 0)
            z_new = np.clip(np.rint((a * qm - tm) / a), 0.0, qmax).astype(np.float32)
            d = q - z_new[:, None, :]
            s_new = (np.einsum("bkn,bkn->bn", cw * target, d) / np.einsum("bkn,bkn->bn", cw * d, d)).astype(np.float32)
            ok &= np.isfinite(s_new) & (s_new > 0)
            s = np.where(ok, s_new, s).astype(np.float32)
            z = np.where(ok, z_new, z).astype(np.float32)
            q = round_codes(wb, s, z, qmax)
            if consider(s, z, q) <= options.tol * float(best_err.sum()):
                break  # HQQ's own stopping rule: the error stopped falling
            beta *= options.kappa
    q = round_codes(wb, best_s, best_z, qmax)
    if options.unbiased:
        what = (q - best_z[:, None, :]) * best_s[:, None, :]
        energy = np.einsum("bkn,bkn->bn", wb, wb, dtype=np.float64)
        overlap = np.einsum("bkn,bkn->bn", what, wb, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where((overlap > 0) & (energy > 0), energy / overlap, 1.0)
        best_s = (best_s * factor).astype(np.float32)
    return best_s, best_z, q


def quantize_hqq(w: np.ndarray, bits: int, block_size: int, options: HqqOptions = HqqOptions()) -> QuantizedMatrix:
    """Quantize ``w [K, N]`` along K in blocks of ``block_size`` with optimised parameters."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] matrix, got shape {w.shape}")
    K, N = w.shape
    nb = -(-K // block_size)
    q = np.empty((K, N), dtype=np.uint8)
    scale = np.empty((nb, N), dtype=np.float32)
    zero_point = np.empty((nb, N), dtype=np.uint8)
    for r0, r1, b0, b1 in block_slabs(K, block_size, N):
        nblk = b1 - b0
        wb = np.asarray(w[r0:r1], dtype=np.float32).reshape(nblk, (r1 - r0) // nblk, N)
        s, z, codes = fit(wb, bits, options)
        q[r0:r1] = codes.reshape(r1 - r0, N)
        scale[b0:b1] = s
        zero_point[b0:b1] = z
    return QuantizedMatrix(q=q, scale=scale, zero_point=zero_point, bits=bits, block_size=block_size, K=K, N=N)
