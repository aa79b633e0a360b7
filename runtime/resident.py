"""The experts held in memory, and the loads on their way: one object owns, per (layer, expert),
what is resident (its precision, engine session and cost) and what is being loaded, so the two
can never drift apart. Budget accounting counts a load from the moment it starts (the loader
allocates then), and the mixed-precision cache's rule holds: at most one copy of an expert is
resident (a finished load replaces a lower copy). Which entries to evict is decided by the pure
``cache.choose_victims``; this class only keeps the books. Single-threaded: the orchestrator owns it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

from .cache import Entry, Key, Reuse, choose_victims


@dataclass
class Resident(Entry):
    session: object = None
    pinned: bool = False
    prefetched: bool = False  # loaded by a prefetch and not yet used


@dataclass
class Loading:
    precision: str
    cost: int  # reserved while in flight: the engine plus its build scratch
    future: Future
    prefetch: bool
    file_bytes: int = 0


@dataclass
class ResidentSet:
    budget: int
    eviction: str = "lru"
    priors: Mapping[Key, float] = field(default_factory=dict)
    decay: float = 0.9  # per-token decay of use counts (frequency-aware eviction)
    resident: dict[Key, Resident] = field(default_factory=dict)
    loading: dict[Key, Loading] = field(default_factory=dict)
    clock: int = 0
    reserve: int = 0  # of the budget, held back for memory the books do not see (memory.HeapGovernor)
    reuse: Reuse | None = None  # the layer cycle, for "reuse" eviction (the orchestrator moves ``now``)

    @property
    def used(self) -> int:
        return sum(r.cost for r in self.resident.values()) + sum(x.cost for x in self.loading.values())

    def get(self, key: Key) -> Resident | None:
        return self.resident.get(key)

    def tick(self) -> None:
        """One generated token: the clock advances and every use count ages."""
        self.clock += 1
        for r in self.resident.values():
            r.uses *= self.decay

    def touch(self, key: Key) -> None:
        r = self.resident[key]
        r.last_used = self.clock
        r.uses += 1.0
        r.prefetched = False

    def add(self, key: Key, precision: str, cost: int, session: object, prefetched: bool = False) -> Resident:
        """Make ``session`` the resident copy of ``key`` (replacing a lower one; history kept)."""
        old = self.resident.get(key)
        r = Resident(precision, cost, old.last_used if old else self.clock, old.uses if old else 0.0, session,
                     pinned=bool(old and old.pinned), prefetched=prefetched)
        self.resident[key] = r
        return r

    def evict(self, key: Key) -> None:
        self.resident.pop(key, None)

    def start(self, key: Key, loading: Loading) -> None:
        self.loading[key] = loading

    def finish(self, key: Key) -> Loading:
        return self.loading.pop(key)

    def finished(self) -> list[Key]:
        return [k for k, x in self.loading.items() if x.future.done()]

    def victims(self, need: int, protect: Iterable[Key]) -> list[Key] | None:
        """Resident entries to evict so ``need`` more bytes fit beside everything resident and
        loading; None when evicting every unprotected, unpinned entry would not do."""
        pinned = {k for k, r in self.resident.items() if r.pinned}
        budget = self.budget - self.reserve - sum(x.cost for x in self.loading.values())
        return choose_victims(self.resident, need, budget, self.eviction, set(protect) | pinned, self.priors,
                              self.reuse)
