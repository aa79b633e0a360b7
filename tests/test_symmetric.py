"""The symmetric INT4 quantizer of the TensorRT form: codes in [-8, 7], fp16-exact scales, the
round-to-nearest bound, and the range search never worse than round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest

from dymoe.toolchain.blockquant import dequantize
from dymoe.toolchain.symmetric import (
    SymOptions,
    _salience,
    _weighted_error,
    codes,
    fit,
    quantize_sym_int4,
    signed_codes,
)


def _weights(seed=0, K=256, N=48):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.02
    w[rng.integers(0, K, 20), rng.integers(0, N, 20)] *= 12  # outliers, as trained weights have
    w[:64, 0] = 0.0  # an all-zero block
    return w


@pytest.mark.parametrize("how", ["rtn", "hqq"])
@pytest.mark.parametrize("block", [64, 128])
def test_codes_and_scales_are_what_the_graph_stores(how, block):
    qm = quantize_sym_int4(_weights(), block, how)
    c = signed_codes(qm)
    assert c.min() >= -8 and c.max() <= 7
    assert np.array_equal(qm.scale, qm.scale.astype(np.float16).astype(np.float32))  # exact in fp16
    assert np.all(qm.scale > 0) and np.all(np.isfinite(qm.scale))
    assert np.all(dequantize(qm)[:64, 0] == 0)  # zeros stay zeros


def test_rtn_is_within_half_a_step():
    w = _weights(1)
    qm = quantize_sym_int4(w, 128, "rtn")
    step = np.repeat(qm.scale, 128, axis=0)
    # amax / 7 keeps every weight in range, so round to nearest is off by at most half a step
    assert np.all(np.abs(dequantize(qm) - w) <= step / 2 * (1 + 1e-3) + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_range_search_never_loses_to_rtn_before_unbiasing(seed):
    wb = _weights(seed).reshape(2, 128, 48)
    s_rtn, c_rtn = fit(wb, "rtn")
    s_hqq, c_hqq = fit(wb, "hqq", SymOptions(unbiased=False))
    weight = _salience(wb, SymOptions().salience)
    e_rtn = _weighted_error(wb, s_rtn, c_rtn, weight)
    e_hqq = _weighted_error(wb, s_hqq, codes(wb, s_hqq), weight)
    assert np.all(e_hqq <= e_rtn + 1e-12)
    assert e_hqq.sum() < e_rtn.sum()  # and wins somewhere on weights with outliers


def test_unbiasing_keeps_the_weights_energy():
    w = _weights(3)
    qm = quantize_sym_int4(w, 128, "hqq")
    wq = dequantize(qm)
    # per (block, column) <w_q, w> = <w, w>, up to the fp16 rounding of the rescaled scale
    overlap = np.einsum("bkn,bkn->bn", wq.reshape(2, 128, -1), w.reshape(2, 128, -1))
    energy = np.einsum("bkn,bkn->bn", w.reshape(2, 128, -1), w.reshape(2, 128, -1))
    live = energy > 0
    assert np.allclose(overlap[live], energy[live], rtol=2e-3)
