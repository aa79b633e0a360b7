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


def minimum_working_set(ladder: Sequence[str], resident: dict[str, int], scratch: dict[str, int],
                        top_k: int) -> int:
    """Bytes one layer's top-k experts need at the ladder's cheapest precision (skip needs none),
    one of them still being built (its scratch counts until it lands)."""
    p = min((p for p in ladder if p != SKIP), key=lambda p: resident[p] + scratch[p])
    return top_k * resident[p] + scratch[p]


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


def critical_count(retention: float, count: int) -> int:
    """How many of ``count`` selected experts are critical at retention ``r`` > 0:
    ``max(1, floor(r * count))``, never rounded up, never zero (calibration adds r = 0, "lower all",
    as its own harshest variant)."""
    return max(1, min(count, math.floor(retention * count + 1e-9)))


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
    critical = critical_count(retention, count)
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


def home_precisions(keys: Sequence[tuple[int, int]], priors: dict[tuple[int, int], float], ladder: Sequence[str],
                    cost: dict[str, int], capacity: int) -> dict[tuple[int, int], str]:
    """The precision each expert runs at when it is critical (its *home*; the others run a step
    lower), chosen so that every expert at its home fits in ``capacity`` bytes when it can: all
    start at the ladder's lowest precision; then, one step at a time for everyone before anyone
    takes two (int2 -> int4 for all buys more than int4 -> int8 for a few), the hottest experts
    (calibration ``priors``; 1.0 is average) move up while the total fits. Asking for more than
    fits would only trade one resident expert for another's promotion, read after read.

    When not even the lowest step fits everyone, the cache must hold a subset anyway: every home
    is then one step above the lowest (the paper's "critical at int4, the rest at int2")."""
    steps = [p for p in ladder if p != SKIP]
    if len(keys) * cost[steps[-1]] > capacity:
        return {k: steps[max(0, len(steps) - 2)] for k in keys}
    level = {k: len(steps) - 1 for k in keys}
    total = len(keys) * cost[steps[-1]]
    order = sorted(keys, key=lambda k: (-priors.get(k, 1.0), k))
    for target in range(len(steps) - 2, -1, -1):
        for k in order:
            extra = cost[steps[target]] - cost[steps[level[k]]]
            if total + extra > capacity:
                break
            level[k] = target
            total += extra
    return {k: steps[level[k]] for k in keys}


def plan_from_homes(importance: dict[int, float], retention: float, ladder: Sequence[str],
                    homes: dict[int, str], all_fit: bool = False) -> dict[int, str]:
    """Like :func:`plan_precisions`, with each expert's ladder starting at its home: the critical
    experts run at their homes, the others ``tier`` steps lower (ending at the ladder's last step,
    which may be skip).

    ``all_fit``: every expert fits in the budget at its home. A lower copy then saves no memory the
    budget needs: loaded on a miss, it stays resident, costs accuracy while it serves, and is read
    again when the expert is next critical (on a CPU it does not even compute faster: int2 runs
    slower than int4). So every expert the plan runs asks for its home; a skip stays a skip."""
    experts = sorted(importance)
    order = np.argsort(-np.asarray([importance[e] for e in experts], dtype=np.float64), kind="stable")
    out = {}
    for rank, idx in enumerate(order):
        e = experts[idx]
        tier = tier_of(rank, len(experts), retention, len(ladder))
        out[e] = capped(ladder[min(ladder.index(homes[e]) + tier, len(ladder) - 1)], homes[e], all_fit)
    return out


def homes_fit(homes: dict, cost: dict[str, int], capacity: int) -> bool:
    """Whether every expert at its home fits in ``capacity`` bytes (``home_precisions`` could fit them)."""
    return sum(cost[p] for p in homes.values()) <= capacity


def capped(precision: str, home: str, all_fit: bool = False) -> str:
    """``precision``, but never above ``home`` (skip stays skip). ``all_fit``: every expert fits at its
    home, so a lower copy would save nothing the budget needs: exactly ``home`` (see plan_from_homes)."""
    if precision == SKIP:
        return SKIP
    return home if all_fit or RANK[precision] > RANK[home] else precision


def top_count(n: int, fraction: float) -> int:
    """How many entries "the top ``fraction``" of ``n`` means: ceil(fraction * n), at least 1."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


def heavy_hitters(colsum: np.ndarray, tokens: int, fraction: float) -> np.ndarray:
    """Indices (into the last ``tokens`` positions) of the heavy-hitter tokens: the top
    ``top_count(tokens, fraction)`` by accumulated attention, ties to the earlier token.
    ``colsum [S]`` holds each key token's attention mass (the layer graph's ``attn_colsum``)."""
    scores = np.asarray(colsum, dtype=np.float64)[-tokens:]
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:top_count(tokens, fraction)])


def heavy_hitter_counts(colsum: np.ndarray, experts: np.ndarray, fraction: float) -> dict[int, int]:
    """Prefill importance: how many heavy-hitter tokens each expert receives; ``experts [T, k]``
    is the routing of the T newest tokens (the last T of S)."""
    counts: dict[int, int] = {}
    for e in experts[heavy_hitters(colsum, experts.shape[0], fraction)].ravel():
        counts[int(e)] = counts.get(int(e), 0) + 1
    return counts


def step_importance(phase: str, experts: np.ndarray, weights: np.ndarray, colsum: np.ndarray,
                    heavy_fraction: float) -> dict[int, float]:
    """Importance of each distinct selected expert of a step: in decode its gate score (one
    token); in prefill the number of heavy-hitter tokens routed to it, the gate mass breaking ties."""
    selected = [int(e) for e in np.unique(experts)]
    mass = {e: float(weights[experts == e].sum()) for e in selected}
    if phase == "decode":
        return mass
    hh = heavy_hitter_counts(colsum, experts, heavy_fraction)
    total = sum(mass.values())
    return {e: hh.get(e, 0) + mass[e] / (1.0 + total) for e in selected}


def plan_precisions(importance: dict[int, float], retention: float, ladder: Sequence[str]) -> dict[int, str]:
    """The precision each selected expert of a step runs at (the ladder's lowest step may be skip)."""
    experts = sorted(importance)
    if len(ladder) == 1:
        return {e: ladder[0] for e in experts}
    return dict(zip(experts, choose_precisions([importance[e] for e in experts], retention, ladder), strict=True))


def renormalise(weights: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Rescale the kept experts' routing weights to the original total (per token)."""
    total = weights.sum(axis=-1, keepdims=True)
    kept_w = np.where(kept, weights, 0.0)
    s = kept_w.sum(axis=-1, keepdims=True)
    return np.where(s > 0, kept_w * total / np.where(s > 0, s, 1.0), 0.0).astype(weights.dtype)


def predicted_experts(scores: np.ndarray, m: int) -> list[int]:
    """Prefetch targets from a predictor's ``scores [T, E]`` (higher: likelier): the union over
    tokens of each token's top-``m`` experts, most total score first (masked experts, -inf, never
    count), ties to the lower index."""
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :m]
    chosen = {int(e) for e in top.ravel() if np.isfinite(scores[:, e]).any()}
    mass = np.where(np.isfinite(scores), scores, 0.0).sum(axis=0)
    return sorted(chosen, key=lambda e: (-mass[e], e))


def plan_prefetch(scores: np.ndarray, m: int, retention: float, ladder: Sequence[str]) -> dict[int, str]:
    """What to load ahead for a later layer, likeliest first: each token's ``m`` likeliest experts
    (from the predictor's scores; a prompt's tokens together touch most experts), each at the
    precision the policy will want (importance: the newest token's score); skipped experts need no
    load. The caller decides how many of them it can afford."""
    experts = predicted_experts(scores, m)
    last = scores[-1]
    importance = [float(last[e]) if np.isfinite(last[e]) else -1e30 for e in experts]
    plan = dict(zip(experts, choose_precisions(importance, retention, ladder), strict=True))
    return {e: p for e, p in plan.items() if p != SKIP}
