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


def eviction_order(entries: Mapping[Key, Entry], policy: str, priors: Mapping[Key, float] | None = None,
                   prior_weight: float = 4.0) -> list[Key]:
    """Keys from first to last to evict.

    ``lru``: least recently used first. ``priority``: lowest score first, where
    score = decayed use count + prior_weight * calibration prior (the expert's share of gate
    mass in its layer, times the number of experts, so 1.0 is average); ties go LRU.
    """
    keys = list(entries)
    if policy == "lru":
        return sorted(keys, key=lambda k: (entries[k].last_used, k))
    if policy == "priority":
        priors = priors or {}
        return sorted(keys, key=lambda k: (entries[k].uses + prior_weight * priors.get(k, 1.0),
                                           entries[k].last_used, k))
    raise ValueError(f"unknown eviction policy {policy!r}")


def choose_victims(entries: Mapping[Key, Entry], need: int, budget: int, policy: str,
                   protect: Iterable[Key] = (), priors: Mapping[Key, float] | None = None) -> list[Key] | None:
    """The entries to evict so that ``need`` more bytes fit within ``budget``; ``None`` when
    even evicting every unprotected entry would not make room."""
    used = sum(e.cost for e in entries.values())
    protected = set(protect)
    victims: list[Key] = []
    for key in eviction_order(entries, policy, priors):
        if used + need <= budget:
            break
        if key in protected:
            continue
        victims.append(key)
        used -= entries[key].cost
    return victims if used + need <= budget else None
