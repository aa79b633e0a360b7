"""Data-free quantizer: optimised scales and zero points (HQQ-style), numpy only.

Same output as :func:`dymoe.toolchain.blockquant.quantize_rtn` - uint8 codes, float32 scale, integer
zero point per (block, column) - so the ONNX encodings (QDQ, MatMulNBits) do not change. Only the
choice of ``scale`` and ``zero_point`` differs. Dimension letters as in ``quantize.py``: ``K`` in,
``N`` out, ``B`` block along K, ``nb`` blocks; a slab of blocks is ``[nblk, B, N]``, every
reduction runs over B with N contiguous (vectorised across columns, and summing each block's B
terms in order, the same arithmetic whatever the slab size), and slabs are sized to stay in cache.

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
   block (under that error; step 4 then trades a little of it for no bias). A candidate is only
   scored on the (block, column)s where it can win: the error is a sum of non-negative terms, so
   the terms of the block's largest and smallest weights alone bound it from below (in floating
   point as well, less a rounding slack: adding a non-negative number never lowers a rounded
   sum). Where that bound already reaches the best error so far, the candidate cannot be strictly
   better and is skipped: the picks are those of the full search. At 8 bits shrinking the range
   nearly never pays, and the bound skips nearly everything; at 2 bits most candidates are scored.
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
from .transpose import c_order

# Elements of a slab searched at once: each float32 temporary is then 512 KiB, so the handful
# alive at a time stay in a core's L2 cache across the ~10 passes of each candidate.
SLAB_ELEMS = 1 << 17


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
    prune: bool = True  # skip candidates that provably cannot win (same picks; False only to test that)


class _Work:
    """Scratch arrays reused for every candidate and slab: a fresh 512 KiB temporary per numpy
    call costs its page faults each time."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        a = self.arrays.get(name)
        if a is None or a.size < size:
            a = self.arrays[name] = np.empty(max(size, SLAB_ELEMS), dtype=np.float32)
        return a[:size].reshape(shape)


def _terms(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float, c: np.ndarray | None,
           out: np.ndarray | None = None) -> np.ndarray:
    """Each element's weighted squared error ``c (s (q - z) - w)^2`` (``s, z`` broadcast against
    ``w``). ``q - z = clip(rint(w / s), -z, qmax - z)`` exactly (integers below 2^24), as
    ``round_codes(...) - z``, two passes fewer."""
    d = np.divide(w, s, dtype=np.float32, out=out)
    np.rint(d, out=d)
    np.maximum(d, -z, out=d)
    np.minimum(d, qmax - z, out=d)
    d *= s
    d -= w
    np.square(d, out=d)
    if c is not None:
        d *= c
    return d


def _sq_error(wb: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float, c: np.ndarray | None,
              out: np.ndarray | None = None, axis: int = 1) -> np.ndarray:
    """Weighted squared error per (block, column): ``[nblk, N]`` for a slab ``wb [nblk, B, N]`` and
    ``s, z [nblk, N]``, or ``[P]`` for gathered blocks ``[B, P]`` (``axis=0``); each block's terms
    are summed in order."""
    d = _terms(wb, np.expand_dims(s, axis), np.expand_dims(z, axis), qmax, c, out)
    return block_sum(d, axis)  # float32 over one block of B elements: ample precision for comparisons


def block_sum(a: np.ndarray, axis: int = 1) -> np.ndarray:
    """``a.sum(axis)`` added up in the order numpy takes along contiguous memory (pairwise: eight
    running sums, then a tree; recursive halves past 128 terms), whatever ``a``'s layout.

    Rounding depends on that order, and two shrunk ranges can tie to within it: the previous
    implementation summed along each block's contiguous run of a transposed torch weight, and
    these sums keep its picks exactly while the slabs here lie column-contiguous (long, fast inner
    loops) instead."""
    n = a.shape[axis]

    def at(i: int | slice) -> np.ndarray:
        return a[(slice(None),) * axis + (i,)]

    if n < 8:
        res = np.zeros_like(at(0))
        for i in range(n):
            res += at(i)
        return res
    if n > 128:
        half = n // 2
        half -= half % 8
        return block_sum(at(slice(0, half)), axis) + block_sum(at(slice(half, n)), axis)
    r = at(slice(0, 8)).copy()
    end = n - n % 8
    for i in range(8, end, 8):
        r += at(slice(i, i + 8))
    part = [r[(slice(None),) * axis + (j,)] for j in range(8)]
    res = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
    for i in range(end, n):
        res += at(i)
    return res


def _salience(wb: np.ndarray, salience: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-element error weights ``1 + salience * w^2 / mean_block(w^2)`` (None: all ones), and the
    factor ``salience / mean`` ``[nblk, 1, N]`` that gives any one element's weight the same way."""
    if salience == 0:
        return None, None
    w2 = np.square(wb)
    mean = np.expand_dims(block_sum(w2) / np.float32(wb.shape[1]), 1)  # w2.mean(axis=1), summed as above
    mean[mean == 0] = 1.0
    factor = np.float32(salience) / mean
    w2 *= factor
    w2 += 1.0
    return w2, factor


# What rounding can take off a float32 sum of B non-negative terms: at most (B - 1) 2^-24 of it,
# plus a few roundings of the bound itself; and an absolute margin for values below the normal range.
_ULP, _TINY = 2.0**-24, np.float32(2.0**-120)


@dataclass
class _Slab:
    """What the search needs of a slab whatever the bit width (shared by an expert's precisions
    through ``quantize_hqq``'s ``memo``)."""

    rows: tuple[int, int, int, int]  # (row start, row stop, block start, block stop), as block_slabs
    wb: np.ndarray  # [nblk, B, N] float32, a view of the contiguous [K, N] weight
    hi: np.ndarray  # [nblk, N] each block's largest weight
    lo: np.ndarray  # and smallest
    weight: np.ndarray | None  # [nblk, B, N] error weights (None: all ones)
    chi: np.ndarray | None  # [nblk, N] the error weights of hi and lo
    clo: np.ndarray | None
    energy: np.ndarray  # [nblk, N] float64 <w, w>, for the unbiasing

    @classmethod
    def of(cls, wb: np.ndarray, rows: tuple[int, int, int, int], salience: float) -> _Slab:
        weight, factor = _salience(wb, salience)
        hi, lo = wb.max(axis=1), wb.min(axis=1)
        # as _salience computes each element's weight: w^2 * factor + 1
        chi, clo = (None, None) if factor is None else (np.square(hi) * factor[:, 0] + 1.0,
                                                        np.square(lo) * factor[:, 0] + 1.0)
        return cls(rows, wb, hi, lo, weight, chi, clo, np.einsum("bkn,bkn->bn", wb, wb, dtype=np.float64))


def _bounds(slab: _Slab, s: np.ndarray, z: np.ndarray, qmax: float) -> np.ndarray:
    """Lower bounds of the blocks' errors under candidates ``s, z [G, nblk, N]``: the terms of each
    block's largest and smallest weight (computed as every term is), added (less the slack
    rounding could take off the whole sum) when they are two elements, else the one."""
    t_hi, t_lo = _terms(slab.hi, s, z, qmax, slab.chi), _terms(slab.lo, s, z, qmax, slab.clo)
    both = t_hi + t_lo
    both *= np.float32(1 - (slab.wb.shape[1] + 4) * _ULP)
    both -= _TINY
    return np.where(slab.hi > slab.lo, both, np.maximum(t_hi, t_lo))


def fit(wb: np.ndarray | _Slab, bits: int, options: HqqOptions = HqqOptions(),
        work: _Work | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, integer zero point (as float32) ``[nblk, N]`` and the float32 codes ``[nblk, B, N]``
    they were fitted with, for blocks ``wb [nblk, B, N]``. ``work``: scratch to reuse."""
    work = work or _Work()
    qmax = float((1 << bits) - 1)
    slab = wb if isinstance(wb, _Slab) else _Slab.of(np.asarray(wb, dtype=np.float32), (0, 0, 0, 0), options.salience)
    wb, weight = slab.wb, slab.weight
    lo0, hi0 = np.minimum(slab.lo, 0.0), np.maximum(slab.hi, 0.0)
    best_s, best_z = minmax_params(lo0, hi0, qmax)  # RTN's own parameters: never worse than RTN
    best_err = _sq_error(wb, best_s, best_z, qmax, weight, work.get("d", wb.shape))

    def consider(s: np.ndarray, z: np.ndarray, bound: np.ndarray | None) -> float:
        """Keep the better parameters per (block, column); return the total error removed.
        ``bound``: lower bounds of the candidate's errors (None: score it everywhere)."""
        if bound is not None:
            live = bound < best_err
            n = int(np.count_nonzero(live))
            if n == 0:
                return 0.0
            if n < live.size // 2:  # score only where the candidate can win (a gather costs a pass)
                at = np.nonzero(live)
                cols = wb.transpose(1, 0, 2)[:, at[0], at[1]]  # [B, n]: each block's terms summed in order
                c = None if weight is None else weight.transpose(1, 0, 2)[:, at[0], at[1]]
                err = _sq_error(cols, s[at], z[at], qmax, c, axis=0)
                better = err < best_err[at]
                at = tuple(a[better] for a in at)
                err = err[better]
                gain = float((best_err[at] - err).sum())
                best_err[at], best_s[at], best_z[at] = err, s[at], z[at]
                return gain
        err = _sq_error(wb, s, z, qmax, weight, work.get("d", wb.shape))
        better = err < best_err
        gain = float((best_err[better] - err[better]).sum())
        best_err[better] = err[better]
        best_s[better] = s[better]
        best_z[better] = z[better]
        return gain

    shrinks = np.array([f for f in options.grid if f != 1.0], dtype=np.float32)[:, None, None]
    if len(shrinks):
        cand_s, cand_z = minmax_params(lo0 * shrinks, hi0 * shrinks, qmax)  # [G, nblk, N], all at once
        bounds = _bounds(slab, cand_s, cand_z, qmax) if options.prune else [None] * len(shrinks)
        for s, z, bound in zip(cand_s, cand_z, bounds, strict=True):
            consider(s, z, bound)  # in the grid's order: the first of equal errors wins
    if options.iters:
        _refine(wb, weight, best_s, best_z, best_err, qmax, options, consider)
    q = round_codes(wb, best_s, best_z, qmax)
    if options.unbiased:
        what = (q - best_z[:, None, :]) * best_s[:, None, :]
        overlap = np.einsum("bkn,bkn->bn", what, wb, dtype=np.float64)
        energy = slab.energy
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where((overlap > 0) & (energy > 0), energy / overlap, 1.0)
        best_s = (best_s * factor).astype(np.float32)
    return best_s, best_z, q


def _refine(wb, weight, best_s, best_z, best_err, qmax, options: HqqOptions, consider) -> None:
    """HQQ's half-quadratic iterations from the range search's best (see the module doc, step 2)."""
    s, z = best_s.copy(), best_z.copy()
    q = round_codes(wb, s, z, qmax)
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
            if consider(s, z, None) <= options.tol * float(best_err.sum()):
                break  # HQQ's own stopping rule: the error stopped falling
            beta *= options.kappa


def fit_params(wb: np.ndarray, bits: int, options: HqqOptions = HqqOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point (as float32) ``[nblk, N]`` for blocks ``wb [nblk, B, N]``."""
    s, z, _ = fit(wb, bits, options)
    return s, z


def quantize_hqq(w: np.ndarray, bits: int, block_size: int, options: HqqOptions = HqqOptions(),
                 memo: dict | None = None) -> QuantizedMatrix:
    """Quantize ``w [K, N]`` along K in blocks of ``block_size`` with optimised parameters.

    ``memo``: a dict kept for this matrix across calls at other bit widths, which then share the
    work that does not depend on them (the contiguous copy of a transposed ``w``, each block's
    extremes, error weights and energy)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] matrix, got shape {w.shape}")
    K, N = w.shape
    key = ("hqq slabs", block_size, options.salience)
    slabs = None if memo is None else memo.get(key)
    if slabs is None:
        slabs = _prepare(w, block_size, options.salience)
        if memo is not None:
            memo[key] = slabs
    nb = -(-K // block_size)
    q = np.empty((K, N), dtype=np.uint8)
    scale = np.empty((nb, N), dtype=np.float32)
    zero_point = np.empty((nb, N), dtype=np.uint8)
    work = _Work()
    for slab in slabs:
        r0, r1, b0, b1 = slab.rows
        s, z, codes = fit(slab, bits, options, work)
        q[r0:r1] = codes.reshape(r1 - r0, N)
        scale[b0:b1] = s
        zero_point[b0:b1] = z
    return QuantizedMatrix(q=q, scale=scale, zero_point=zero_point, bits=bits, block_size=block_size, K=K, N=N)


def _prepare(w: np.ndarray, block_size: int, salience: float) -> list[_Slab]:
    """``w [K, N]`` in cache-sized slabs of whole blocks (and the short last block alone)."""
    K, N = w.shape
    w_kn = c_order(np.asarray(w, dtype=np.float32))  # a transposed torch weight: one strip-wise copy
    per_slab = max(1, SLAB_ELEMS // (block_size * N))
    out = []
    for r0, r1, b0, b1 in block_slabs(K, block_size, N):
        for c0 in range(b0, b1, per_slab):  # block_slabs' slabs are 16 MiB: split them for the cache
            c1 = min(b1, c0 + per_slab)
            rows = (r0 + (c0 - b0) * block_size, min(r1, r0 + (c1 - b0) * block_size), c0, c1)
            wb = w_kn[rows[0]:rows[1]].reshape(c1 - c0, (rows[1] - rows[0]) // (c1 - c0), N)
            out.append(_Slab.of(wb, rows, salience))
    return out
