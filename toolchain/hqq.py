"""Data-free quantizer: optimised scales and zero points (HQQ-style), numpy only.

Same output as :func:`dymoe.toolchain.blockquant.quantize_rtn` - uint8 codes, float32 scale, integer
zero point per (block, column) - so the ONNX encodings (QDQ, MatMulNBits) do not change. Only the
choice of ``scale`` and ``zero_point`` differs. Dimension letters as in ``quantize.py``: ``K`` in,
``N`` out, ``B`` block along K, ``nb`` blocks. The search works on *pairs*: one row ``[P, B]`` per
(block, column), which is how a torch ``Linear`` weight ``[N, K]`` already lies in memory (each
block of a column is B consecutive floats), so it needs no transposed copy, every reduction runs
along contiguous memory, and a subset of pairs is a cheap row gather.

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
   scored on the pairs where it can win: the error of a pair is a sum of non-negative terms, so
   the terms of its largest and smallest weights alone bound it from below (in floating point as
   well: adding a non-negative number never lowers a rounded sum). Where that bound already
   reaches the best error so far, the candidate cannot be strictly better and is skipped: the
   picks are those of the full search. At 8 bits shrinking the range nearly never pays, and the
   bound skips nearly everything; at 2 bits most candidates are scored.
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

from .blockquant import SUPPORTED_BITS, QuantizedMatrix, minmax_params

# Pairs searched at once: each float32 temporary of the search is then 4096 x 32 x 4 = 512 KiB, so
# the handful alive at a time stay in a core's L2 cache across the ~10 passes of each candidate.
CHUNK_PAIRS = 4096


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


def codes(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float) -> np.ndarray:
    """Float32 codes ``clip(rint(w / s) + z, 0, qmax)`` of pairs ``w [P, B]`` (``s, z [P]``): what
    :func:`blockquant.round_codes` computes, element for element."""
    t = np.divide(w, s[:, None], dtype=np.float32)
    np.rint(t, out=t)
    t += z[:, None]
    np.clip(t, 0.0, qmax, out=t)
    return t


class _Work:
    """Scratch arrays the search reuses for every candidate and chunk: a fresh 512 KiB temporary
    per numpy call costs its page faults each time, nearly doubling the time of a candidate."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        a = self.arrays.get(name)
        if a is None or a.size < size:
            a = self.arrays[name] = np.empty(max(size, CHUNK_PAIRS * 32), dtype=np.float32)
        return a[:size].reshape(shape)


def _residual(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float, out: np.ndarray | None = None) -> np.ndarray:
    """``s (q - z) - w`` with the codes ``q`` of ``(s, z)``: ``q - z = clip(rint(w / s), -z, qmax - z)``
    exactly (integers below 2^24), which saves two passes."""
    t = np.divide(w, s[..., None], dtype=np.float32, out=out)
    np.rint(t, out=t)
    np.maximum(t, -z[..., None], out=t)
    np.minimum(t, qmax - z[..., None], out=t)
    t *= s[..., None]
    t -= w
    return t


def _error(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float, c: np.ndarray | None,
           work: _Work | None = None) -> np.ndarray:
    """Weighted squared error per pair, ``sum_B c (s (q - z) - w)^2``, ``[P]``."""
    work = work or _Work()
    t = _residual(w, s, z, qmax, work.get("t", w.shape))
    return np.einsum("pb,pb->p", t if c is None else np.multiply(t, c, out=work.get("tc", w.shape)), t)


def _extremes(w: np.ndarray) -> np.ndarray:
    """``[P, 2]``: each pair's largest and smallest weight, by halving the rows (numpy's own min and
    max along a short contiguous axis cost ten times more; the result is the same)."""
    hi = lo = w
    while hi.shape[1] > 1:
        h = hi.shape[1] // 2
        odd = hi.shape[1] % 2
        hi = np.maximum(hi[:, :h], hi[:, h:2 * h]) if not odd else np.maximum(hi[:, :h + 1], hi[:, h:])
        lo = np.minimum(lo[:, :h], lo[:, h:2 * h]) if not odd else np.minimum(lo[:, :h + 1], lo[:, h:])
    return np.concatenate([hi, lo], axis=1)


# Rounding slack of a float32 sum of at most a few hundred non-negative terms, relative (each
# addition and product rounds by at most 2^-24 of its value) and absolute (below the normal range).
_SLACK, _TINY = np.float32(1 - 2.0**-14), np.float32(2.0**-120)


def _bounds(ext: np.ndarray, cext: np.ndarray | None, s: np.ndarray, z: np.ndarray, qmax: float) -> np.ndarray:
    """Lower bounds ``[G, P]`` of the pairs' errors under candidates ``s, z [G, P]``: the error
    terms of each pair's largest and smallest weight ``ext [P, 2]``, computed as :func:`_error`
    computes every term, added (less the slack that rounding in the full sum could take off) when
    they are two elements, else the one."""
    t = _residual(ext, s, z, qmax)  # [G, P, 2]
    terms = (t if cext is None else t * cext) * t
    both = terms[..., 0] + terms[..., 1]
    both *= _SLACK
    both -= _TINY
    return np.where(ext[:, 0] > ext[:, 1], both, np.maximum(terms[..., 0], terms[..., 1]))


def _salience(w: np.ndarray, salience: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-element error weights ``1 + salience * w^2 / mean_block(w^2)`` (None: all ones), and the
    per-pair factor ``salience / mean`` that gives any one element's weight the same way."""
    if salience == 0:
        return None, None
    w2 = np.square(w)
    mean = np.einsum("pb->p", w2) / np.float32(w.shape[1])
    mean[mean == 0] = 1.0
    factor = np.float32(salience) / mean
    w2 *= factor[:, None]
    w2 += 1.0
    return w2, factor


@dataclass
class _Pairs:
    """What the search needs of a set of pairs whatever the bit width (shared by an expert's
    precisions through ``quantize_hqq``'s ``memo``)."""

    w: np.ndarray  # [P, B] float32, contiguous
    ext: np.ndarray  # [P, 2]: each pair's largest and smallest weight
    weight: np.ndarray | None  # [P, B] error weights (None: all ones)
    factor: np.ndarray | None  # [P] salience / mean(w^2)
    energy: np.ndarray  # [P] float64 <w, w>, for the unbiasing

    @classmethod
    def of(cls, w: np.ndarray, salience: float) -> _Pairs:
        w = np.ascontiguousarray(w, dtype=np.float32)
        weight, factor = _salience(w, salience)
        return cls(w, _extremes(w), weight, factor, np.einsum("pb,pb->p", w, w, dtype=np.float64))


def fit_pairs(w: np.ndarray | _Pairs, bits: int, options: HqqOptions = HqqOptions(),
              work: _Work | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, integer zero point (as float32) ``[P]`` and the float32 codes ``[P, B]`` they were
    fitted with, for pairs ``w [P, B]``. ``work``: scratch to reuse (one per thread)."""
    work = work or _Work()
    qmax = float((1 << bits) - 1)
    pairs = w if isinstance(w, _Pairs) else _Pairs.of(w, options.salience)
    w, ext, weight, factor = pairs.w, pairs.ext, pairs.weight, pairs.factor
    hi0, lo0 = np.maximum(ext[:, 0], 0.0), np.minimum(ext[:, 1], 0.0)
    # the error weights of each pair's extreme elements, as _salience computes them element-wise
    cext = None if factor is None else np.square(ext) * factor[:, None] + 1.0
    best_s, best_z = minmax_params(lo0, hi0, qmax)  # RTN's own parameters: never worse than RTN
    best_err = _error(w, best_s, best_z, qmax, weight, work)

    def consider(s: np.ndarray, z: np.ndarray, bound: np.ndarray | None) -> float:
        """Keep the better parameters per pair; return the total error removed. ``bound``: lower
        bounds of the candidate's errors (None: score it everywhere)."""
        rows = None  # every pair
        if bound is not None:
            live = bound < best_err
            n = int(np.count_nonzero(live))
            if n == 0:
                return 0.0
            if n < len(live) // 2:  # score only where the candidate can win (a gather costs a pass)
                rows = np.flatnonzero(live)
        if rows is None:
            err = _error(w, s, z, qmax, weight, work)
            rows = np.flatnonzero(err < best_err)
            err = err[rows]
        else:
            shape = (len(rows), w.shape[1])
            gather = [np.take(a, rows, axis=0, out=work.get(name, shape))
                      for name, a in (("w", w), ("c", weight)) if a is not None]
            err = _error(gather[0], s[rows], z[rows], qmax, gather[1] if len(gather) > 1 else None, work)
            better = err < best_err[rows]
            rows, err = rows[better], err[better]
        gain = float((best_err[rows] - err).sum())
        best_err[rows] = err
        best_s[rows] = s[rows]
        best_z[rows] = z[rows]
        return gain

    shrinks = np.array([f for f in options.grid if f != 1.0], dtype=np.float32)[:, None]
    if len(shrinks):
        cand_s, cand_z = minmax_params(lo0 * shrinks, hi0 * shrinks, qmax)  # [G, P], all candidates at once
        bounds = _bounds(ext, cext, cand_s, cand_z, qmax) if options.prune else [None] * len(shrinks)
        for s, z, bound in zip(cand_s, cand_z, bounds, strict=True):
            consider(s, z, bound)  # in the grid's order: the first of equal errors wins, as it always did
    if options.iters:
        _refine(w, weight, best_s, best_z, best_err, qmax, options, consider)
    q = codes(w, best_s, best_z, qmax)
    if options.unbiased:
        what = (q - best_z[:, None]) * best_s[:, None]
        energy = pairs.energy
        overlap = np.einsum("pb,pb->p", what, w, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where((overlap > 0) & (energy > 0), energy / overlap, 1.0)
        best_s = (best_s * scale).astype(np.float32)
    return best_s, best_z, q


def _refine(w, weight, best_s, best_z, best_err, qmax, options: HqqOptions, consider) -> None:
    """HQQ's half-quadratic iterations from the range search's best (see the module doc, step 2)."""
    s, z = best_s.copy(), best_z.copy()
    q = codes(w, s, z, qmax)
    cw = np.ones_like(w) if weight is None else weight
    total = cw.sum(axis=1)
    beta = options.beta
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(options.iters):
            u = w - (q - z[:, None]) * s[:, None]  # residual...
            u /= s[:, None]  # ...in units of the step
            mag = np.abs(u)
            shrunk = np.maximum(mag - np.power(mag, options.lp - 1.0) / np.float32(beta), 0.0)
            target = w - np.sign(u) * shrunk * s[:, None]  # w minus its sparse outlier part
            del u, mag, shrunk
            # weighted least squares target ~ a q + b per pair, then z = -b / a rounded
            qm = np.einsum("pb,pb->p", cw, q) / total
            tm = np.einsum("pb,pb->p", cw, target) / total
            qc = q - qm[:, None]
            qc_w = qc * cw
            a = np.einsum("pb,pb->p", qc_w, target - tm[:, None]) / np.einsum("pb,pb->p", qc_w, qc)
            del qc, qc_w
            ok = np.isfinite(a) & (a > 0)
            z_new = np.clip(np.rint((a * qm - tm) / a), 0.0, qmax).astype(np.float32)
            d = q - z_new[:, None]
            s_new = (np.einsum("pb,pb->p", cw * target, d) / np.einsum("pb,pb->p", cw * d, d)).astype(np.float32)
            ok &= np.isfinite(s_new) & (s_new > 0)
            s = np.where(ok, s_new, s).astype(np.float32)
            z = np.where(ok, z_new, z).astype(np.float32)
            q = codes(w, s, z, qmax)
            if consider(s, z, None) <= options.tol * float(best_err.sum()):
                break  # HQQ's own stopping rule: the error stopped falling
            beta *= options.kappa


def fit_params(wb: np.ndarray, bits: int, options: HqqOptions = HqqOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point (as float32) ``[nblk, N]`` for blocks ``wb [nblk, B, N]``."""
    nblk, B, N = wb.shape
    s, z, _ = fit_pairs(np.transpose(wb, (0, 2, 1)).reshape(nblk * N, B), bits, options)
    return s.reshape(nblk, N), z.reshape(nblk, N)


def quantize_hqq(w: np.ndarray, bits: int, block_size: int, options: HqqOptions = HqqOptions(),
                 memo: dict | None = None) -> QuantizedMatrix:
    """Quantize ``w [K, N]`` along K in blocks of ``block_size`` with optimised parameters.

    ``w`` is best the transposed view of a torch weight ``[N, K]`` (what ``quantize_expert``
    passes): then no copy of it is made. The codes come back as the ``[K, N]`` view of an
    ``[N, K]`` array, the layout MatMulNBits stores. ``memo``: a dict kept for this matrix across
    calls at other bit widths, which then share the work that does not depend on them."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] matrix, got shape {w.shape}")
    K, N = w.shape
    B = block_size
    nfull, tail = divmod(K, B)
    nb = nfull + (tail > 0)
    key = ("hqq pairs", block_size, options.salience)
    parts = None if memo is None else memo.get(key)
    if parts is None:
        parts = _prepare(w, block_size, options.salience)
        if memo is not None:
            memo[key] = parts
    q = np.empty((N, K), dtype=np.uint8)
    scale = np.empty((N, nb), dtype=np.float32)
    zero_point = np.empty((N, nb), dtype=np.uint8)
    work = _Work()
    for b0, b1, width, chunks in parts:
        got = [fit_pairs(c, bits, options, work) for c in chunks]
        scale[:, b0:b1] = np.concatenate([g[0] for g in got]).reshape(N, b1 - b0)
        zero_point[:, b0:b1] = np.concatenate([g[1] for g in got]).reshape(N, b1 - b0)
        q[:, b0 * B:b0 * B + (b1 - b0) * width] = np.concatenate([g[2] for g in got]).reshape(N, (b1 - b0) * width)
    return QuantizedMatrix(q=q.T, scale=np.ascontiguousarray(scale.T), zero_point=np.ascontiguousarray(zero_point.T),
                           bits=bits, block_size=B, K=K, N=N)


def _prepare(w: np.ndarray, block_size: int, salience: float) -> list[tuple[int, int, int, list[_Pairs]]]:
    """``w [K, N]`` as pairs: ``(first block, end block, block width, chunks)`` for the whole
    blocks and, when K is not a multiple of the block, the short last one."""
    K, N = w.shape
    B = block_size
    nfull, tail = divmod(K, B)
    w_nk = np.ascontiguousarray(np.asarray(w).T, dtype=np.float32)  # no copy for a transposed torch weight
    spans = [(0, nfull, B)] if nfull else []
    if tail:
        spans.append((nfull, nfull + 1, tail))
    out = []
    for b0, b1, width in spans:
        pairs = w_nk[:, b0 * B:b0 * B + (b1 - b0) * width].reshape(N * (b1 - b0), width)
        out.append((b0, b1, width, [_Pairs.of(pairs[p0:p0 + CHUNK_PAIRS], salience)
                                    for p0 in range(0, len(pairs), CHUNK_PAIRS)]))
    return out
