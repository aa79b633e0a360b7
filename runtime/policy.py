"""Pure decisions of the DyMoE runtime: ladders, depth schedules and per-expert precision.

Everything here takes explicit inputs and returns plain values, so it is tested with tables;
loading, caching and timing live elsewhere.

Precision names are the bundle's ("fp32", "fp16", "int8", "int4", "int2") plus ``SKIP``: the
expert is not run at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dymoe.bundle.errors import InputError
from dymoe.bundle.precisions import RANK, SHORT, SKIP


def minimum_working_set(ladder: Sequence[str], costs: dict[str, int], top_k: int) -> int:
    """Bytes one layer's top-k experts need at the ladder's lowest precision (skip needs none)."""
    steps = [p for p in ladder if p != SKIP]
    return top_k * min(costs[p] for p in steps)


def parse_ladder(text: str, available: Sequence[str]) -> list[str]:
    """``"4/2"`` -> ``["int4", "int2"]``; ``"fp16/4/0"`` -> ``["fp16", "int4", "skip"]``.

    Steps must strictly decrease and exist in the bundle (skip always exists).
    """
    steps = []
    for raw in text.split("/"):
        token = raw.strip().lower()
        name = SHORT.get(token, token)
        if name not in RANK:
            raise InputError(f"ladder step {raw!r} in {text!r} is not a precision",
                             "use steps like 16/8/4/2/0 or names fp32, fp16, int8, int4, int2, skip")
        if name != SKIP and name not in available:
            raise InputError(f"ladder {text!r} needs {name}, which this bundle lacks (it has {', '.join(available)})",
                             "choose a ladder from the bundle's precisions, or re-export with them")
        steps.append(name)
    if not steps or steps[0] == SKIP:
        raise InputError(f"ladder {text!r} must start with a precision", "for example 4/2 or fp16/4/0")
    if any(RANK[a] <= RANK[b] for a, b in zip(steps[:-1], steps[1:], strict=True)):
        raise InputError(f"ladder {text!r} must go from high to low precision", "for example 8/4/2")
    return steps


def cosine_retention(layer: int, num_layers: int, r_max: float, r_min: float) -> float:
    """The paper's depth schedule: r decays along a half cosine from ``r_max`` at the first
    layer to ``r_min`` at the last, r(l) = r_min + (r_max - r_min) * (1 + cos(pi * l / (L - 1))) / 2."""
    if num_layers <= 1:
        return r_max
    return r_min + (r_max - r_min) * (1.0 + math.cos(math.pi * layer / (num_layers - 1))) / 2.0


def tier_of(rank: int, count: int, retention: float, tiers: int) -> int:
    """Which ladder step the expert ranked ``rank`` (0 = most important) of ``count`` gets.

    The top ``max(1, floor(retention * count))`` experts are critical (tier 0): retention is
    never rounded up, so r = 0.75 with top-2 keeps one expert high, and the most important
    expert always stays critical. The rest are spread in rank order over the remaining
    ``tiers - 1`` steps in equal shares, the less important the lower. With the paper's
    two-step ladders this is exactly "critical high, others low".
    """
    if tiers <= 1:
        return 0
    critical = max(1, math.floor(retention * count + 1e-9))
    if rank < critical:
        return 0
    rest = count - critical
    return 1 + min(tiers - 2, (rank - critical) * (tiers - 1) // max(rest, 1))


def choose_precisions(importance: Sequence[float], retention: float, ladder: Sequence[str]) -> list[str]:
    """Precision per selected expert, in the order given, from its importance (gate score in
    decode, heavy-hitter count in prefill). Ties keep the given order (stable)."""
    order = np.argsort(-np.asarray(importance, dtype=np.float64), kind="stable")
    out = [ladder[0]] * len(order)
    for rank, idx in enumerate(order):
        out[idx] = ladder[tier_of(rank, len(order), retention, len(ladder))]
    return out


def heavy_hitter_counts(colsum: np.ndarray, experts: np.ndarray, fraction: float) -> dict[int, int]:
    """Prefill importance: how many heavy-hitter tokens each expert receives. Heavy hitters are
    the top ``fraction`` of the prompt's tokens by accumulated attention (at least one).

    ``colsum [S]`` holds each key token's attention mass; ``experts [T, k]`` the routing of the
    T newest tokens (the last T of S).
    """
    t = experts.shape[0]
    scores = colsum[-t:]
    n = max(1, math.ceil(fraction * t))
    heavy = np.argsort(-scores, kind="stable")[:n]
    counts: dict[int, int] = {}
    for e in experts[heavy].ravel():
        counts[int(e)] = counts.get(int(e), 0) + 1
    return counts


def renormalise(weights: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Rescale the kept experts' routing weights to the original total (per token)."""
    total = weights.sum(axis=-1, keepdims=True)
    kept_w = np.where(kept, weights, 0.0)
    s = kept_w.sum(axis=-1, keepdims=True)
    return np.where(s > 0, kept_w * total / np.where(s > 0, s, 1.0), 0.0).astype(weights.dtype)


def predicted_experts(router_logits: np.ndarray, m: int) -> list[int]:
    """Prefetch targets: the union over tokens of each token's top-``m`` predicted experts, in
    order of first appearance by descending probability mass over all tokens."""
    z = router_logits - router_logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :m]
    chosen = set(int(e) for e in top.ravel())
    mass = p.sum(axis=0)
    return sorted(chosen, key=lambda e: (-mass[e], e))
