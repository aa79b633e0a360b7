"""Pure statistics used by calibration: skew of an importance vector, heavy hitters, prediction
recall and the divergence of next-token distributions. No I/O, no ONNX; numpy in, numbers out."""

from __future__ import annotations

import math

import numpy as np

from dymoe.runtime.maths import log_softmax
from dymoe.runtime.policy import top_count


def _nonneg(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("empty importance vector")
    if (x < 0).any() or not np.isfinite(x).all():
        raise ValueError("importance values must be finite and non-negative")
    return x


def gini(values) -> float:
    """Gini coefficient: 0 when every entry is equal, (n - 1) / n when one entry holds everything.

    G = sum_i sum_j |x_i - x_j| / (2 n^2 mean), computed from the sorted values as
    (2 sum_i i x_(i)) / (n sum x) - (n + 1) / n with i = 1..n. All zeros give 0.
    """
    x = np.sort(_nonneg(values))
    n, total = x.size, x.sum()
    if total == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(max(0.0, 2.0 * (i * x).sum() / (n * total) - (n + 1) / n))


def normalized_entropy(values) -> float:
    """Shannon entropy of ``values / sum`` divided by log(n): 1 when even, 0 when one entry holds all.

    A single entry, or all zeros, count as even (1.0): there is no skew to measure.
    """
    x = _nonneg(values)
    n, total = x.size, x.sum()
    if n == 1 or total == 0:
        return 1.0
    p = x[x > 0] / total
    return float(min(1.0, max(0.0, -(p * np.log(p)).sum() / math.log(n))))


def top_share(values, fraction: float) -> float:
    """Share of the total held by the largest ``top_count(n, fraction)`` entries (all zeros: 0)."""
    x = np.sort(_nonneg(values))[::-1]
    total = x.sum()
    if total == 0:
        return 0.0
    return float(x[:top_count(x.size, fraction)].sum() / total)


def coverage_count(values, mass: float) -> int:
    """Fewest entries (largest first) whose sum reaches ``mass`` of the total (all zeros: 0)."""
    x = np.sort(_nonneg(values))[::-1]
    total = x.sum()
    if total == 0:
        return 0
    cum = np.cumsum(x) / total
    return int(min(x.size, np.searchsorted(cum, mass - 1e-12) + 1))


def topk_experts(logits: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` columns per row, largest first, ties to the lower index (as routing does)."""
    return np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :k]


def recall_hits(predicted: np.ndarray, actual: np.ndarray) -> int:
    """Number of (token, actual expert) pairs whose expert is among that token's predicted ones."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    return int((actual[:, :, None] == predicted[:, None, :]).any(axis=-1).sum())


def recall_at_k(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over tokens of |predicted ∩ actual| / |actual| (predicted [T, k'], actual [T, k])."""
    actual = np.asarray(actual)
    return recall_hits(predicted, actual) / actual.size


def kl_rows(ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || Q) per row in nats, from the reference log-probabilities and Q's logits."""
    ref_logp = np.asarray(ref_logp, dtype=np.float64)
    logq = log_softmax(logits)
    return np.maximum(0.0, (np.exp(ref_logp) * (ref_logp - logq)).sum(axis=-1))


def nll_rows(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (teacher forcing), per position."""
    return nll_of(log_softmax(np.asarray(logits)[:-1]), ids)


def nll_of(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """As :func:`nll_rows`, from log-probabilities (any rows past ``len(ids) - 1`` are ignored)."""
    target = np.asarray(ids)[1:]
    return -logp[np.arange(target.size), target]
