"""The mixed-precision expert cache: what is resident, at which precision, and what to evict.

The paper's rules: at most one copy of an expert is resident; a resident higher precision
serves a request for a lower one (a hit); a resident lower copy with a higher request is a
miss that loads the higher copy and replaces the lower one (promotion). Eviction extends LRU.

The decisions (:func:`classify`, :func:`eviction_order`, :func:`choose_victims`) are pure and
tested as tables; ``resident.ResidentSet`` keeps the books they decide on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dymoe.bundle.precisions import RANK

Key = tuple[int, int]  # (layer, expert)

HIT, MISS, PROMOTE = "hit", "miss", "promote"


@dataclass
class Entry:
    precision: str
    cost: int  # resident bytes this copy takes
    last_used: int = 0  # logical clock of the last use
    uses: float = 0.0  # decayed use count (for frequency-aware eviction)


def classify(resident: Entry | None, requested: str) -> str:
    if resident is None:
        return MISS
    return HIT if RANK[resident.precision] >= RANK[requested] else PROMOTE


@dataclass(frozen=True)
class Reuse:
    """What ``reuse`` eviction knows of time: the MoE layers in the order a token runs them, the
    one running now, an average expert's chance to be selected by a token (top-k / E), and the
    per-token decay of the entries' use counts."""

    layers: tuple[int, ...]
    now: int  # the MoE layer whose step is running
    base_rate: float
    decay: float = 0.9


def use_rate(entry: Entry, prior: float, reuse: Reuse) -> float:
    """An expert's chance to be selected by the next token: the calibration prior's (prior 1.0 is
    an average expert) and the observed one (a use count decayed by ``decay`` per token settles at
    rate / (1 - decay)), averaged; kept in [0.001, 1]."""
    observed = entry.uses * (1.0 - reuse.decay)
    return min(1.0, max(1e-3, 0.5 * reuse.base_rate * prior + 0.5 * observed))


def reuse_distance(key: Key, entry: Entry, prior: float, reuse: Reuse) -> float:
    """Expected MoE-layer steps until ``key`` is used again: the steps until its layer runs next
    (1 for the layer after this one, L for this one) plus L per token it is expected to sit out.
    Tokens run the layers in a cycle, so under LRU the layer that runs next holds the least
    recently used entries, exactly the ones about to be needed; this is Belady's rule with that
    cycle and each expert's rate instead of the unknown future."""
    n = len(reuse.layers)
    pos, now = reuse.layers.index(key[0]), reuse.layers.index(reuse.now)
    steps = (pos - now - 1) % n + 1
    return steps + n * (1.0 / use_rate(entry, prior, reuse) - 1.0)


def eviction_order(entries: Mapping[Key, Entry], policy: str, priors: Mapping[Key, float] | None = None,
                   prior_weight: float = 4.0, reuse: Reuse | None = None) -> list[Key]:
    """Keys from first to last to evict.

    ``lru``: least recently used first. ``priority``: lowest score first, where
    score = decayed use count + prior_weight * calibration prior (the expert's share of gate
    mass in its layer, times the number of experts, so 1.0 is average); ties go LRU.
    ``reuse``: the longest expected :func:`reuse_distance` first (needs ``reuse``); ties go LRU.
    """
    keys = list(entries)
    priors = priors or {}
    if policy == "lru":
        return sorted(keys, key=lambda k: (entries[k].last_used, k))
    if policy == "priority":
        return sorted(keys, key=lambda k: (entries[k].uses + prior_weight * priors.get(k, 1.0),
                                           entries[k].last_used, k))
    if policy == "reuse":
        if reuse is None:
            raise ValueError("reuse eviction needs the layer cycle")
        return sorted(keys, key=lambda k: (-reuse_distance(k, entries[k], priors.get(k, 1.0), reuse),
                                           entries[k].last_used, k))
    raise ValueError(f"unknown eviction policy {policy!r}")


def choose_victims(entries: Mapping[Key, Entry], need: int, budget: int, policy: str,
                   protect: Iterable[Key] = (), priors: Mapping[Key, float] | None = None,
                   reuse: Reuse | None = None) -> list[Key] | None:
    """The entries to evict so that ``need`` more bytes fit within ``budget``; ``None`` when
    even evicting every unprotected entry would not make room."""
    used = sum(e.cost for e in entries.values())
    protected = set(protect)
    victims: list[Key] = []
    for key in eviction_order(entries, policy, priors, reuse=reuse):
        if used + need <= budget:
            break
        if key in protected:
            continue
        victims.append(key)
        used -= entries[key].cost
    return victims if used + need <= budget else None
