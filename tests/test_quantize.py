"""Tests for dymoe.toolchain.blockquant (blocked RTN quantization).

Letters: K in-features (rows, quantized axis), N out-features (columns), B block size.
"""

import numpy as np
import pytest

from dymoe.toolchain import blockquant as qz
from dymoe.toolchain.blockquant import QuantizedMatrix, dequantize, pack_codes, quantize_rtn, unpack_codes

# (bits, one block of one column, expected scale, expected zero point, expected codes).
# Values are chosen so that scale is a power of two and everything is exact.
TABLE = [
    # lo=-1, hi=2 -> scale 1, zp 1
    (2, [-1.0, 0.0, 1.0, 2.0], 1.0, 1, [0, 1, 2, 3]),
    # all positive: range widened to include 0 -> lo=0, zp 0; 0.4 -> 0, 1.6 -> 2
    (2, [0.4, 1.6, 3.0, 1.0], 1.0, 0, [0, 2, 3, 1]),
    # all negative: hi widened to 0 -> zp = qmax
    (2, [-3.0, -1.0, -2.0, -0.4], 1.0, 3, [0, 2, 1, 3]),
    # all zero block: scale falls back to 1, zp 0, codes 0
    (2, [0.0, 0.0, 0.0, 0.0], 1.0, 0, [0, 0, 0, 0]),
    # 4 bit: lo=-0.75, hi=3 -> scale (3.75)/15 = 0.25, zp 3
    (4, [-0.75, 0.0, 1.25, 3.0], 0.25, 3, [0, 3, 8, 15]),
    # 4 bit with a value between grid points (0.3 / 0.25 = 1.2 -> 1)
    (4, [-0.75, 0.3, -0.5, 3.0], 0.25, 3, [0, 4, 1, 15]),
    # 8 bit: lo=-64, hi=191 -> scale 1, zp 64
    (8, [-64.0, 0.0, 100.0, 191.0], 1.0, 64, [0, 64, 164, 255]),
    # 8 bit, scale 2^-4
    (8, [-4.0, 0.0, 0.0625, 11.9375], 0.0625, 64, [0, 64, 65, 255]),
]


@pytest.mark.parametrize("bits,vals,scale,zp,codes", TABLE)
def test_table(bits, vals, scale, zp, codes):
    w = np.array(vals, dtype=np.float32)[:, None]  # K=4, N=1, one block
    qm = quantize_rtn(w, bits, block_size=4)
    assert qm.q.dtype == np.uint8 and qm.scale.dtype == np.float32
    assert qm.zero_point.dtype == np.uint8
    assert qm.q.shape == (4, 1) and qm.scale.shape == (1, 1) and qm.zero_point.shape == (1, 1)
    assert qm.scale[0, 0] == scale
    assert qm.zero_point[0, 0] == zp
    np.testing.assert_array_equal(qm.q[:, 0], codes)
    deq = dequantize(qm)
    assert deq.dtype == np.float32
    # every table entry that lies on the grid must come back exactly
    on_grid = np.isclose(np.array(vals) / scale, np.round(np.array(vals) / scale))
    np.testing.assert_array_equal(deq[on_grid, 0], np.array(vals, np.float32)[on_grid])


def test_blocks_and_columns_are_independent():
    # 2 blocks x 2 columns, each (block, column) gets its own scale/zp
    w = np.array([
        [-1.0, 0.0],
        [2.0, 15.0],
        [-30.0, 0.25],
        [0.0, -0.5],
    ], dtype=np.float32)
    qm = quantize_rtn(w, 2, block_size=2)
    np.testing.assert_array_equal(qm.scale, [[1.0, 5.0], [10.0, 0.25]])
    np.testing.assert_array_equal(qm.zero_point, [[1, 0], [3, 2]])
    np.testing.assert_array_equal(qm.q, [[0, 0], [3, 3], [0, 3], [3, 0]])
    np.testing.assert_array_equal(dequantize(qm), w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("K,N,B", [(128, 48, 32), (256, 17, 64), (100, 8, 32), (96, 5, 128)])
def test_rtn_properties(bits, K, N, B):
    rng = np.random.default_rng(bits * 1000 + K + N)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[rng.random((K, N)) < 0.05] = 0.0  # some exact zeros
    qm = quantize_rtn(w, bits, B)
    nb = -(-K // B)
    assert (qm.K, qm.N, qm.bits, qm.block_size, qm.n_blocks) == (K, N, bits, B, nb)
    assert qm.q.shape == (K, N) and qm.scale.shape == (nb, N) and qm.zero_point.shape == (nb, N)
    qmax = (1 << bits) - 1
    assert qm.q.max() <= qmax and qm.zero_point.max() <= qmax
    assert (qm.scale > 0).all()
    deq = dequantize(qm)
    # RTN property: error at most half a step (plus float32 rounding slack)
    step = np.repeat(qm.scale, B, axis=0)[:K]
    assert (np.abs(deq - w) <= step * (0.5 + 1e-5)).all()
    # zero is always representable and maps exactly
    assert (deq[w == 0] == 0).all()
    # each block's extremes are hit: the grid spans [min(lo,0), max(hi,0)]
    assert qm.q.min() == 0


def test_short_last_block_equals_zero_padding():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((100, 7)).astype(np.float32)
    padded = np.concatenate([w, np.zeros((28, 7), np.float32)])
    a = quantize_rtn(w, 4, 32)
    b = quantize_rtn(padded, 4, 32)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero_point, b.zero_point)
    np.testing.assert_array_equal(a.q, b.q[:100])
    np.testing.assert_array_equal(dequantize(a), dequantize(b)[:100])


def test_transposed_view_and_chunking(monkeypatch):
    rng = np.random.default_rng(4)
    w_torch = rng.standard_normal((40, 160)).astype(np.float32)  # [N, K] torch layout
    ref = quantize_rtn(np.ascontiguousarray(w_torch.T), 4, 32)
    view = quantize_rtn(w_torch.T, 4, 32)
    # force many small slabs (incl. a short tail block) through the same code path
    monkeypatch.setattr(qz, "_CHUNK_ELEMS", 64)
    small = quantize_rtn(w_torch.T, 4, 32)
    odd = quantize_rtn(w_torch.T[:150], 4, 32)
    for qm in (view, small):
        np.testing.assert_array_equal(qm.q, ref.q)
        np.testing.assert_array_equal(qm.scale, ref.scale)
        np.testing.assert_array_equal(qm.zero_point, ref.zero_point)
        np.testing.assert_array_equal(dequantize(qm), dequantize(ref))
    monkeypatch.undo()
    odd_ref = quantize_rtn(w_torch.T[:150], 4, 32)
    np.testing.assert_array_equal(odd.q, odd_ref.q)
    np.testing.assert_array_equal(odd.scale, odd_ref.scale)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
@pytest.mark.parametrize("shape", [(768, 2048), (37, 5), (1, 9), (16, 16), (0, 4)])
def test_transposed_copy(dtype, shape):
    from dymoe.toolchain.transpose import c_order, transposed

    a = (np.random.default_rng(7).standard_normal(shape) * 50).astype(dtype)
    t = transposed(a)
    assert t.flags.c_contiguous and t.dtype == a.dtype
    np.testing.assert_array_equal(t, a.T)
    for view in (a, a.T, a[::2]):
        c = c_order(view)
        assert c.flags.c_contiguous
        np.testing.assert_array_equal(c, view)


def test_float64_input():
    w = np.random.default_rng(5).standard_normal((64, 4))
    a = quantize_rtn(w, 8, 32)
    b = quantize_rtn(w.astype(np.float32), 8, 32)
    assert a.scale.dtype == np.float32
    # float32 rounding is monotonic, so the float64 path agrees with the float32 one
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    assert np.abs(dequantize(a) - w).max() <= a.scale.max() * 0.5001


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_onnxruntime_quantizer(bits):
    """ORT's own C++ blockwise quantizer uses the same scheme: identical codes/scales."""
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    fn = getattr(pybind, f"quantize_matmul_{bits}bits", None)
    if fn is None:
        pytest.skip(f"quantize_matmul_{bits}bits not available")
    K, N, B = 256, 24, 32
    w = np.random.default_rng(bits).standard_normal((K, N)).astype(np.float32)
    nb = K // B
    packed = np.zeros((N, nb, B * bits // 8), np.uint8)
    scales = np.zeros((N, nb), np.float32)
    zps = np.zeros((N, -(-nb * bits // 8)), np.uint8)
    fn(packed, w, scales, zps, B, N, K, False)
    qm = quantize_rtn(w, bits, B)
    np.testing.assert_array_equal(scales, qm.scale.T)
    # also pins the packing layout used for MatMulNBits
    np.testing.assert_array_equal(zps, pack_codes(qm.zero_point.T, bits))
    np.testing.assert_array_equal(packed, pack_codes(qm.q.T.reshape(N, nb, B), bits))


def test_pack_codes_layout():
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(np.array([1, 15, 7]), 4).tolist() == [0xF1, 0x07]  # padded
    assert pack_codes(np.array([[3, 200]]), 8).tolist() == [[3, 200]]
    rng = np.random.default_rng(6)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(3, 5, 13), dtype=np.uint8)
        packed = pack_codes(codes, bits)
        assert packed.shape == (3, 5, -(-13 * bits // 8))
        np.testing.assert_array_equal(unpack_codes(packed, bits, 13), codes)


def test_invalid_arguments():
    w = np.zeros((32, 2), np.float32)
    with pytest.raises(ValueError):
        quantize_rtn(w, 3, 32)
    with pytest.raises(ValueError):
        quantize_rtn(w[0], 4, 32)
    with pytest.raises(ValueError):
        quantize_rtn(w, 4, 0)
    assert isinstance(quantize_rtn(w, 4, 32), QuantizedMatrix)
