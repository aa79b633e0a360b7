"""The embedding table and LM head are read and quantized a slab of rows at a time: the codes must be
those of the whole matrix, byte for byte, and the float forms the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

from dymoe.toolchain.backbone_forms import BackboneForm, quantize_matrix
from dymoe.toolchain.vocab_rows import VocabRows, quantize_vocab


def _table(v: int = 1000, h: int = 96) -> np.ndarray:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((v, h)) * 0.02).astype(np.float32)
    w[17, 5] = 0.7  # an outlier in one row's block
    w[900:] *= 10  # rows of another scale in the last slab
    return w


@pytest.mark.parametrize("quantizer", ["hqq", "rtn"])
@pytest.mark.parametrize("bits", [8, 4])
def test_slabs_give_the_codes_of_the_whole(quantizer, bits):
    w = _table()
    form = BackboneForm(precision="int8", quantizer=quantizer)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return w[a:b].copy()

    whole = quantize_matrix(w.T, bits, form)
    slabbed = quantize_vocab(VocabRows(read, w.shape, slab_rows=300), lambda x: quantize_matrix(x, bits, form))
    assert reads == [(0, 300), (300, 600), (600, 900), (900, 1000)]  # never the whole table at once
    for name in ("q", "scale", "zero_point"):
        assert np.array_equal(getattr(whole, name), getattr(slabbed, name)), name
    assert (slabbed.K, slabbed.N, slabbed.bits, slabbed.block_size) == (whole.K, whole.N, whole.bits, whole.block_size)


def test_a_plain_array_is_quantized_whole():
    w = _table(64, 32)
    form = BackboneForm(precision="int8")
    a = quantize_vocab(w, lambda x: quantize_matrix(x, 8, form))
    assert np.array_equal(a.q, quantize_matrix(w.T, 8, form).q)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_as_an_array_it_is_the_table(dtype):
    w = _table(50, 8)
    m = VocabRows(lambda a, b: w[a:b].copy(), w.shape, slab_rows=7)
    got = np.asarray(m, dtype=dtype)
    assert got.dtype == dtype and np.array_equal(got, w.astype(dtype))


def test_only_matrices():
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        VocabRows(lambda a, b: None, (4, 4, 4))
