"""The DyMoE expert executor: importance-aware precision, a mixed-precision cache under a
memory budget, and look-ahead prefetch, behind the same ``ExpertExecutor`` seam as the static
runtime. The decisions come from :mod:`policy` and :mod:`cache` (pure); this module performs
them: it asks the loader, waits when it must (stall), and counts everything.

T tokens of the step, H hidden, k experts per token, E experts per layer.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.precisions import RANK, SKIP

from .bundle import Bundle
from .cache import HIT, MISS, PROMOTE, CacheState, Entry, Key, classify
from .experts import LayerStep
from .loader import Loaded, Loader
from .policy import (
    choose_precisions,
    heavy_hitter_counts,
    minimum_working_set,
    predicted_experts,
    renormalise,
)
from .policy_config import PolicyConfig


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
    pred_hits: int = 0  # |predicted ∩ actual| summed over layer transitions
    pred_total: int = 0  # |predicted|
    actual_total: int = 0  # |actual|
    load_errors: int = 0
    peak_resident: int = 0
    mix: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))


def check_budget(config: PolicyConfig, costs: dict[str, int], budget: int, top_k: int) -> None:
    need = minimum_working_set(config.ladder, costs, top_k)
    if budget < need:
        lowest = min((p for p in config.ladder if p != SKIP), key=RANK.get)
        raise InputError(
            f"budget {budget / 2**20:.1f} MiB is below the minimum working set {need / 2**20:.1f} MiB "
            f"(one layer's top-{top_k} experts at {lowest}, policy {config.name})",
            "raise --budget, or use a lower-precision ladder",
        )


class Orchestrator:
    def __init__(self, bundle: Bundle, config: PolicyConfig, loader: Loader, costs: dict[str, int], budget: int,
                 retention: list[float], routers: list[np.ndarray] | None = None,
                 priors: dict[Key, float] | None = None, on_note: Callable[[str], None] | None = None) -> None:
        self.bundle = bundle
        self.notes: list[str] = []
        self.on_note = on_note
        self.spec = bundle.spec
        self.config = config
        self.loader = loader
        self.costs = costs
        self.retention = retention  # r(l) per layer
        self.routers = routers  # [H, E] per layer, for look-ahead prediction
        self.cache = CacheState(budget=budget, policy=config.eviction, priors=priors or {})
        self.sessions: dict[Key, object] = {}
        self.pending: dict[Key, tuple[str, Future, bool]] = {}  # key -> (precision, future, is_prefetch)
        self.prefetched: set[Key] = set()  # ready entries that came from a prefetch, not yet used
        self.predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it at this token
        self.c = RunCounters()
        self._check_budget()
        if config.pin_fraction > 0 and priors:
            self._pin_hot(priors)

    # --- set-up -------------------------------------------------------------------------

    def _check_budget(self) -> None:
        check_budget(self.config, self.costs, self.cache.budget, self.spec.top_k)

    def _pin_hot(self, priors: dict[Key, float]) -> None:
        """Load and pin the experts calibration found hottest, up to pin_fraction of the budget."""
        room = int(self.config.pin_fraction * self.cache.budget)
        p = self.config.ladder[0]
        for key in sorted(priors, key=lambda k: (-priors[k], k)):
            if self.costs[p] > room:
                break
            loaded = self.loader.load(key[0], key[1], p)
            self._insert(loaded, prefetch=False)
            self.cache.pinned.add(key)
            room -= self.costs[p]

    # --- the ExpertExecutor interface ---------------------------------------------------

    def run(self, step: LayerStep) -> np.ndarray:
        if step.layer == 0:
            self.cache.tick()
        self._collect_finished()
        decode = step.phase == "decode"
        wanted = self._precisions(step)
        self._account_prediction(step)
        if self.config.prefetch and self.routers is not None:
            self._prefetch(step)
        x = step.router_input
        out = np.zeros_like(x)
        weights = step.weights
        kept = np.ones_like(step.experts, dtype=bool)
        for e, p in wanted.items():
            if p == SKIP:
                kept &= step.experts != e
        if self.config.renormalize and not kept.all():
            weights = renormalise(weights, kept)
        protect = {(step.layer, e) for e in wanted}  # this layer's experts stay while it runs
        for e in sorted(wanted):
            p = wanted[e]
            self.c.mix[step.layer][p] += 1
            if p == SKIP:
                self.c.skipped += 1
                continue
            session = self._acquire((step.layer, e), p, decode, protect)
            tok, slot = np.nonzero(step.experts == e)
            y = session.run([io.EXPERT_OUT], {io.EXPERT_IN: x[tok]})[0]
            out[tok] += weights[tok, slot][:, None] * y
            if not self.config.cache:
                self._evict((step.layer, e))
        return out

    def close(self) -> None:
        self.loader.close()
        self.sessions.clear()
        self.pending.clear()

    # --- decisions ----------------------------------------------------------------------

    def _precisions(self, step: LayerStep) -> dict[int, str]:
        """Precision per distinct selected expert of this step."""
        selected = [int(e) for e in np.unique(step.experts)]
        ladder, r = self.config.ladder, self.retention[step.layer]
        if len(ladder) == 1:
            return {e: ladder[0] for e in selected}
        if step.phase == "decode":
            # one token: importance is its gate score
            importance = [float(step.weights[step.experts == e].sum()) for e in selected]
        else:
            hh = heavy_hitter_counts(step.attn_colsum, step.experts, self.config.heavy_fraction)
            mass = {e: float(step.weights[step.experts == e].sum()) for e in selected}
            # heavy-hitter tokens first, gate mass breaks ties
            importance = [hh.get(e, 0) + mass[e] / (1.0 + sum(mass.values())) for e in selected]
        return dict(zip(selected, choose_precisions(importance, r, ladder), strict=True))

    def _predict(self, step: LayerStep, target: int) -> dict[int, str]:
        """Experts (and precisions) layer ``target`` is likely to want, from this layer's
        normalised hidden state through ``target``'s router."""
        logits = step.router_input[-1:] @ self.routers[target] if step.phase == "decode" \
            else step.router_input @ self.routers[target]
        m = self.config.prefetch_top or self.spec.top_k
        experts = predicted_experts(logits, m)
        if step.phase != "decode":
            experts = experts[: m]  # a prompt touches most experts; fetch only the likeliest
        z = logits[-1] - logits[-1].max()
        p = np.exp(z) / np.exp(z).sum()
        prec = choose_precisions([float(p[e]) for e in experts], self.retention[target], self.config.ladder)
        return dict(zip(experts, prec, strict=True))

    def _account_prediction(self, step: LayerStep) -> None:
        predicted = self.predicted.pop(step.layer, None)
        if predicted is None or step.phase != "decode":
            return
        actual = {int(e) for e in np.unique(step.experts)}
        self.c.pred_hits += len(predicted & actual)
        self.c.pred_total += len(predicted)
        self.c.actual_total += len(actual)

    # --- effects ------------------------------------------------------------------------

    def _prefetch(self, step: LayerStep) -> None:
        current = set(self._keys(step.layer, np.unique(step.experts)))
        for ahead in range(1, self.config.prefetch + 1):
            target = step.layer + ahead
            if target >= self.spec.num_layers:
                break
            wants = self._predict(step, target)
            if ahead == 1:
                self.predicted[target] = set(wants)
            protect = current | set(self._keys(target, wants))
            for e, p in wants.items():
                if p == SKIP:
                    continue
                key = (target, e)
                resident = self.cache.entries.get(key)
                if classify(resident, p) == HIT or key in self.pending:
                    continue
                self._start_load(key, p, prefetch=True, protect=protect)

    @staticmethod
    def _keys(layer: int, experts) -> list[Key]:
        return [(layer, int(e)) for e in experts]

    def _start_load(self, key: Key, precision: str, prefetch: bool, protect: set[Key]) -> bool:
        """Load in the background; a lower copy stays resident (and usable) until this lands,
        so both count against the budget meanwhile."""
        cost = self.costs[precision]
        victims = self.cache.make_room(cost, protect | {key})
        if victims is None:
            return False
        for v in victims:
            self._evict(v)
        self.cache.reserved[key] = cost
        self.pending[key] = (precision, self.loader.submit(key[0], key[1], precision), prefetch)
        if prefetch:
            self.c.prefetch_issued += 1
        self.c.peak_resident = max(self.c.peak_resident, self.cache.used)
        return True

    def _collect_finished(self) -> None:
        for key in [k for k, (_, f, _) in self.pending.items() if f.done()]:
            self._finish(key)

    def _finish(self, key: Key) -> Loaded | None:
        precision, fut, prefetch = self.pending.pop(key)
        self.cache.reserved.pop(key, None)
        try:
            loaded = fut.result()
        except DymoeError as e:
            self.c.load_errors += 1
            if self.config.on_load_error != "fallback":
                raise
            # the request that needs it will load (or fall back) on demand
            self.note(f"background load of expert {key[1]} in layer {key[0]} failed: {e.message}")
            return None
        self._insert(loaded, prefetch)
        return loaded

    def _insert(self, loaded: Loaded, prefetch: bool) -> None:
        key = (loaded.layer, loaded.expert)
        old = self.cache.entries.get(key)
        self.cache.entries[key] = Entry(loaded.precision, self.costs[loaded.precision],
                                        old.last_used if old else self.cache.clock, old.uses if old else 0.0)
        self.sessions[key] = loaded.session  # replaces a lower copy: at most one per expert
        if prefetch:
            self.prefetched.add(key)
        self.c.peak_resident = max(self.c.peak_resident, self.cache.used)

    def _evict(self, key: Key) -> None:
        self.cache.entries.pop(key, None)
        self.sessions.pop(key, None)
        self.prefetched.discard(key)
        self.cache.pinned.discard(key)

    def _acquire(self, key: Key, precision: str, decode: bool, protect: set[Key]):
        """A session for ``key`` at ``precision`` or higher, loading (and stalling) if needed."""
        self.c.requests += 1
        lower_now = self.config.serve_lower_while_promoting and \
            classify(self.cache.entries.get(key), precision) == PROMOTE
        if key in self.pending and not lower_now:  # its load is in flight: wait (counted as stall)
            t = time.perf_counter()
            self._finish(key)
            self._stall(time.perf_counter() - t, decode)
        kind = classify(self.cache.entries.get(key), precision)
        if kind == HIT:
            self.c.hits += 1
            if key in self.prefetched:
                self.c.prefetch_used += 1
                self.prefetched.discard(key)
            self.cache.touch(key)
            return self.sessions[key]
        if kind == PROMOTE and self.config.serve_lower_while_promoting:
            self.c.promotions += 1
            self.c.served_lower += 1
            if key not in self.pending:
                self._start_load(key, precision, prefetch=False, protect=protect)
            self.cache.touch(key)
            return self.sessions[key]
        self.c.misses += kind == MISS
        self.c.promotions += kind == PROMOTE
        t = time.perf_counter()
        loaded = self._load_now(key, precision, protect)
        self._stall(time.perf_counter() - t, decode)
        self.cache.touch(key)
        return loaded.session

    def _load_now(self, key: Key, precision: str, protect: set[Key]) -> Loaded:
        self._evict(key)  # a lower copy being promoted: we wait anyway, free it first
        cost = self.costs[precision]
        victims = self.cache.make_room(cost, protect)
        if victims is None:
            # the rest of the budget is held by this layer's other experts: let them go
            victims = self.cache.make_room(cost, ()) or []
        for v in victims:
            self._evict(v)
        try:
            loaded = self.loader.load(key[0], key[1], precision)
        except DymoeError as e:
            self.c.load_errors += 1
            if self.config.on_load_error != "fallback":
                raise
            loaded = self._fallback(key, precision, e)
        self._insert(loaded, prefetch=False)
        return loaded

    def _fallback(self, key: Key, precision: str, error: DymoeError) -> Loaded:
        """Another precision of the same expert, nearest first (lower before higher)."""
        others = sorted((p for p in self.bundle.precisions if p != precision),
                        key=lambda p: (abs(RANK[p] - RANK[precision]), RANK[p]))
        for p in others:
            try:
                loaded = self.loader.load(key[0], key[1], p)
            except DymoeError:
                continue
            self.note(f"expert {key[1]} of layer {key[0]} at {precision} failed to load ({error.message}); "
                      f"using {p} instead")
            return loaded
        raise BundleError(f"no precision of expert {key[1]} in layer {key[0]} loads ({error.message})",
                          "re-export the bundle")

    def note(self, message: str) -> None:
        """Something the user should hear about that did not stop the run (a fallback)."""
        self.notes.append(message)
        if self.on_note is not None:
            self.on_note(message)

    def _stall(self, seconds: float, decode: bool) -> None:
        self.c.stall_s += seconds
        if decode:
            self.c.decode_stall_s += seconds

    # --- metrics ------------------------------------------------------------------------

    def report(self, decode_tokens: int, decode_bytes: int) -> dict:
        c, t = self.c, self.loader.totals
        return {
            "policy": self.config.name,
            "policy_config": {k: v for k, v in vars(self.config).items()},
            "retention_by_layer": self.retention,
            "budget_bytes": self.cache.budget,
            "resident_cost_bytes": self.costs,
            "peak_resident_bytes": c.peak_resident,
            "storage": self.loader.storage.label,
            "emulated_storage": self.loader.storage.profile is not None,
            "stall_s": c.stall_s,
            "stall_per_token_s": c.decode_stall_s / decode_tokens,
            "bytes_read": t.bytes_read,
            "bytes_read_per_token": decode_bytes / decode_tokens,
            "loads": t.loads,
            "load_read_s": t.read_s,
            "load_create_s": t.create_s,
            "requests": c.requests,
            "hit_rate": c.hits / c.requests if c.requests else 0.0,
            "misses": c.misses,
            "promotions": c.promotions,
            "served_lower_while_promoting": c.served_lower,
            "skipped": c.skipped,
            "prefetch_issued": c.prefetch_issued,
            "prefetch_used": c.prefetch_used,
            "prefetch_precision": c.pred_hits / c.pred_total if c.pred_total else None,
            "prefetch_recall": c.pred_hits / c.actual_total if c.actual_total else None,
            "load_errors": c.load_errors,
            "notes": list(self.notes),
            "precision_mix": {str(layer): dict(sorted(mix.items())) for layer, mix in sorted(c.mix.items())},
        }
