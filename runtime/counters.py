"""What a budgeted run did, counted by an observer the orchestrator tells of every event (hits,
misses, promotions, skips, stalls, prefetches, predictions, load errors), and the run's report."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .cache import Key


@dataclass
class RunCounters:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    served_lower: int = 0  # promotions answered by the resident lower copy meanwhile
    skipped: int = 0
    stall_s: float = 0.0
    decode_stall_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched loads that a later request hit
    prefetch_cancelled: int = 0  # prefetches dropped before they started (stale predictions)
    pred_hits: int = 0  # |predicted ∩ actual| summed over layer transitions
    pred_total: int = 0  # |predicted|
    actual_total: int = 0  # |actual|
    load_errors: int = 0
    peak_resident: int = 0
    mix: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    notes: list[str] = field(default_factory=list)

    # --- events ---------------------------------------------------------------------------

    def planned(self, layer: int, precision: str) -> None:
        self.mix[layer][precision] += 1

    def skip(self, n: int = 1) -> None:
        self.skipped += n

    def hit(self, key: Key, prefetched: bool) -> None:
        self.requests += 1
        self.hits += 1
        self.prefetch_used += prefetched

    def miss(self, promotion: bool, served_lower: bool = False) -> None:
        self.requests += 1
        self.promotions += promotion
        self.misses += not promotion
        self.served_lower += served_lower

    def stall(self, seconds: float, decode: bool) -> None:
        self.stall_s += seconds
        if decode:
            self.decode_stall_s += seconds

    def prefetch(self) -> None:
        self.prefetch_issued += 1

    def cancelled(self) -> None:
        self.prefetch_cancelled += 1

    def prediction(self, predicted: set[int], actual: set[int]) -> None:
        self.pred_hits += len(predicted & actual)
        self.pred_total += len(predicted)
        self.actual_total += len(actual)

    def load_error(self) -> None:
        self.load_errors += 1

    def resident(self, used: int) -> None:
        self.peak_resident = max(self.peak_resident, used)

    # --- one generation of many ---------------------------------------------------------------

    def since(self, earlier: RunCounters) -> RunCounters:
        """What happened after ``earlier`` (a copy taken then): counts and times subtracted, the
        peak kept (it was reset when the copy was taken), later notes only."""
        out = copy.deepcopy(self)
        for f in dataclasses.fields(self):
            if f.name not in ("peak_resident", "mix", "notes"):
                setattr(out, f.name, getattr(self, f.name) - getattr(earlier, f.name))
        out.mix = defaultdict(Counter, {layer: mix - earlier.mix.get(layer, Counter())
                                        for layer, mix in self.mix.items()})
        out.notes = self.notes[len(earlier.notes):]
        return out

    # --- the report -------------------------------------------------------------------------

    def report(self, decode_tokens: int) -> dict:
        return {
            "peak_resident_bytes": self.peak_resident,
            "stall_s": self.stall_s,
            "stall_per_token_s": self.decode_stall_s / decode_tokens,
            "requests": self.requests,
            "hit_rate": self.hits / self.requests if self.requests else 0.0,
            "misses": self.misses,
            "promotions": self.promotions,
            "served_lower_while_promoting": self.served_lower,
            "skipped": self.skipped,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_used": self.prefetch_used,
            "prefetch_cancelled": self.prefetch_cancelled,
            "prefetch_precision": self.pred_hits / self.pred_total if self.pred_total else None,
            "prefetch_recall": self.pred_hits / self.actual_total if self.actual_total else None,
            "load_errors": self.load_errors,
            "notes": list(self.notes),
            "precision_mix": {str(layer): dict(sorted(mix.items())) for layer, mix in sorted(self.mix.items()) if mix},
        }
