"""The combine step: each selected expert runs once on its tokens, outputs are summed in ascending
expert order, so the result is bit-identical whether the experts ran on one thread or several."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dymoe.runtime.experts import LayerStep, combine


def _step(tokens: int, k: int, experts: int, seed: int = 0) -> LayerStep:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    w = rng.random((tokens, k)).astype(np.float32)
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    return LayerStep(0, "decode" if tokens == 1 else "prefill", x, ids, w / w.sum(1, keepdims=True),
                     np.zeros(tokens, np.float32), x)


MATS = np.random.default_rng(1).standard_normal((32, 16, 16)).astype(np.float32)


def _forward(seen: list | None = None):
    def f(e: int, x: np.ndarray):
        if seen is not None:
            seen.append((e, threading.get_ident()))
        return None if e == 5 else np.tanh(x @ MATS[e])  # expert 5 skipped
    return f


def _reference(step: LayerStep) -> np.ndarray:
    out = np.zeros_like(step.router_input)
    for t in range(step.experts.shape[0]):
        for j, e in enumerate(step.experts[t]):
            if e != 5:
                out[t] += step.weights[t, j] * np.tanh(step.router_input[t:t + 1] @ MATS[e])[0]
    return out


@pytest.mark.parametrize("tokens, k", [(1, 8), (1, 2), (7, 4), (1, 1)])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_bits(tokens, k, threads):
    step = _step(tokens, k, 32, seed=tokens * 10 + k)
    one = combine(step, _forward())
    seen: list = []
    with ThreadPoolExecutor(threads - 1) as pool:
        many = combine(step, _forward(seen), pool=pool, threads=threads)
    assert np.array_equal(one, many)
    np.testing.assert_allclose(one, _reference(step), rtol=1e-5, atol=1e-6)
    distinct = np.unique(step.experts)
    assert sorted(e for e, _ in seen) == sorted(distinct.tolist())  # each expert ran exactly once
    if len(distinct) >= threads:  # the work was shared: the caller ran a share and the pool the rest
        assert threading.get_ident() in {t for _, t in seen} and len({t for _, t in seen}) >= 2
