"""The export's BLAS thread limit: set, and given back afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from dymoe.toolchain.blas import _openblas, one_blas_thread, set_blas_threads


def test_one_blas_thread_inside_the_block_and_the_old_count_after():
    if _openblas() is None:
        pytest.skip("numpy here does not use OpenBLAS: nothing to limit")
    before = set_blas_threads(3)
    try:
        with one_blas_thread():
            assert set_blas_threads(1) == 1
            a = np.ones((64, 64), np.float32)
            np.testing.assert_array_equal(a @ a, np.full((64, 64), 64, np.float32))  # BLAS still works
        assert set_blas_threads(3) == 3
    finally:
        set_blas_threads(before)
