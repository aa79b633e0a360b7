"""The DyMoE expert executor: it runs each MoE layer's step under a memory budget. The decisions
are pure functions of ``policy`` (which precision each selected expert gets, what to prefetch)
and ``cache`` (hit, miss or promotion; what to evict); the books are the ``ResidentSet``'s; the
events go to an observer (``RunCounters``). This module only performs: it asks the loader,
waits when it must (a stall), and runs the expert sessions.

T tokens of the step, H hidden, k experts per token, E experts per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.precisions import RANK, SKIP

from .bundle import Bundle
from .cache import HIT, PROMOTE, Key, classify
from .counters import RunCounters
from .experts import LayerStep, combine
from .loader import Loaded, Loader
from .policy import minimum_working_set, plan_precisions, plan_prefetch, renormalise, step_importance
from .policy_config import PolicyConfig
from .predictor import Predictor
from .resident import Loading, ResidentSet


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
                 retention: list[float], predictor: Predictor | None = None,
                 priors: dict[Key, float] | None = None, on_note: Callable[[str], None] | None = None) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.config = config
        self.loader = loader
        self.costs = costs
        self.retention = retention  # r(l) per layer
        self.predictor = predictor  # look-ahead: the later layers' routing rules
        self.on_note = on_note
        self.resident = ResidentSet(budget=budget, eviction=config.eviction, priors=priors or {})
        self.c = RunCounters()
        self.predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it at this token
        check_budget(config, costs, budget, self.spec.top_k)
        if config.pin_fraction > 0 and priors:
            self._pin_hot(priors)

    def _pin_hot(self, priors: dict[Key, float]) -> None:
        """Load and pin the experts calibration found hottest, up to pin_fraction of the budget."""
        room = int(self.config.pin_fraction * self.resident.budget)
        p = self.config.ladder[0]
        for key in sorted(priors, key=lambda k: (-priors[k], k)):
            if self.costs[p] > room:
                break
            self._insert(self.loader.load(key[0], key[1], p), prefetch=False).pinned = True
            room -= self.costs[p]

    # --- the ExpertExecutor interface ---------------------------------------------------

    def run(self, step: LayerStep) -> np.ndarray:
        if step.layer == self.spec.moe_layers[0]:
            self.resident.tick()
        for key in self.resident.finished():
            self._finish(key)
        decode = step.phase == "decode"
        importance = step_importance(step.phase, step.experts, step.weights, step.attn_colsum,
                                     self.config.heavy_fraction)
        wanted = plan_precisions(importance, self.retention[step.layer], self.config.ladder)
        self._account_prediction(step)
        if self.config.prefetch and self.predictor is not None:
            self._prefetch(step)
        weights = step.weights
        kept = ~np.isin(step.experts, [e for e, p in wanted.items() if p == SKIP])
        if self.config.renormalize and not kept.all():
            weights = renormalise(weights, kept)
        protect = {(step.layer, e) for e in wanted}  # this layer's experts stay while it runs
        for p in wanted.values():
            self.c.planned(step.layer, p)

        def forward(e: int, x: np.ndarray) -> np.ndarray | None:
            if wanted[e] == SKIP:
                self.c.skip()
                return None
            session = self._acquire((step.layer, e), wanted[e], decode, protect)
            y = session.run([io.EXPERT_OUT], {io.EXPERT_IN: x})[0]
            if not self.config.cache:
                self.resident.evict((step.layer, e))
            return y

        return combine(step, forward, weights)

    def close(self) -> None:
        self.loader.close()
        self.resident.resident.clear()
        self.resident.loading.clear()

    # --- look-ahead ---------------------------------------------------------------------

    def _account_prediction(self, step: LayerStep) -> None:
        predicted = self.predicted.pop(step.layer, None)
        if predicted is not None and step.phase == "decode":
            self.c.prediction(predicted, {int(e) for e in np.unique(step.experts)})

    def _prefetch(self, step: LayerStep) -> None:
        """Start loading what the next MoE layers' routing rules pick on this layer's state."""
        current = {(step.layer, int(e)) for e in np.unique(step.experts)}
        x = step.router_input[-1:] if step.phase == "decode" else step.router_input
        m = self.config.prefetch_top or self.spec.top_k
        for ahead in range(1, self.config.prefetch + 1):
            target = self.predictor.ahead(step.layer, ahead)
            if target is None:
                break
            wants = plan_prefetch(self.predictor.scores(target, x), m, self.retention[target], self.config.ladder)
            if ahead == 1:
                self.predicted[target] = set(wants)
            protect = current | {(target, e) for e in wants}
            for e, p in wants.items():
                key = (target, e)
                if classify(self.resident.get(key), p) == HIT or key in self.resident.loading:
                    continue
                self._start_load(key, p, prefetch=True, protect=protect)

    # --- loading --------------------------------------------------------------------------

    def _start_load(self, key: Key, precision: str, prefetch: bool, protect: set[Key]) -> bool:
        """Load in the background; a lower copy stays resident (and usable) until this lands,
        so both count against the budget meanwhile."""
        cost = self.costs[precision]
        victims = self.resident.victims(cost, protect | {key})
        if victims is None:
            return False
        for v in victims:
            self.resident.evict(v)
        future = self.loader.submit(key[0], key[1], precision)
        self.resident.start(key, Loading(precision, cost, future, prefetch))
        if prefetch:
            self.c.prefetch()
        self.c.resident(self.resident.used)
        return True

    def _finish(self, key: Key) -> Loaded | None:
        loading = self.resident.finish(key)
        try:
            loaded = loading.future.result()
        except DymoeError as e:
            self.c.load_error()
            if self.config.on_load_error != "fallback":
                raise
            # the request that needs it will load (or fall back) on demand
            self.note(f"background load of expert {key[1]} in layer {key[0]} failed: {e.message}")
            return None
        self._insert(loaded, loading.prefetch)
        return loaded

    def _insert(self, loaded: Loaded, prefetch: bool):
        r = self.resident.add((loaded.layer, loaded.expert), loaded.precision, self.costs[loaded.precision],
                              loaded.session, prefetched=prefetch)
        self.c.resident(self.resident.used)
        return r

    def _acquire(self, key: Key, precision: str, decode: bool, protect: set[Key]):
        """A session for ``key`` at ``precision`` or higher, loading (and stalling) if needed."""
        lower_now = self.config.serve_lower_while_promoting and \
            classify(self.resident.get(key), precision) == PROMOTE
        if key in self.resident.loading and not lower_now:  # its load is in flight: wait (a stall)
            t = time.perf_counter()
            self._finish(key)
            self.c.stall(time.perf_counter() - t, decode)
        resident = self.resident.get(key)
        kind = classify(resident, precision)
        if kind == HIT:
            self.c.hit(key, resident.prefetched)
            self.resident.touch(key)
            return resident.session
        if kind == PROMOTE and self.config.serve_lower_while_promoting:
            self.c.miss(promotion=True, served_lower=True)
            if key not in self.resident.loading:
                self._start_load(key, precision, prefetch=False, protect=protect)
            self.resident.touch(key)
            return resident.session
        self.c.miss(promotion=kind == PROMOTE)
        t = time.perf_counter()
        session = self._load_now(key, precision, protect).session
        self.c.stall(time.perf_counter() - t, decode)
        self.resident.touch(key)
        return session

    def _load_now(self, key: Key, precision: str, protect: set[Key]) -> Loaded:
        self.resident.evict(key)  # a lower copy being promoted: we wait anyway, free it first
        cost = self.costs[precision]
        victims = self.resident.victims(cost, protect)
        if victims is None:
            # the rest of the budget is held by this layer's other experts: let them go
            victims = self.resident.victims(cost, ()) or []
        for v in victims:
            self.resident.evict(v)
        try:
            loaded = self.loader.load(key[0], key[1], precision)
        except DymoeError as e:
            self.c.load_error()
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
        self.c.notes.append(message)
        if self.on_note is not None:
            self.on_note(message)

    # --- metrics ------------------------------------------------------------------------

    def report(self, decode_tokens: int, decode_bytes: int) -> dict:
        t = self.loader.totals
        return {
            "policy": self.config.name,
            "policy_config": dict(vars(self.config)),
            "retention_by_layer": self.retention,
            "budget_bytes": self.resident.budget,
            "resident_cost_bytes": self.costs,
            "storage": self.loader.storage.label,
            "emulated_storage": self.loader.storage.profile is not None,
            "bytes_read": t.bytes_read,
            "bytes_read_per_token": decode_bytes / decode_tokens,
            "loads": t.loads,
            "load_read_s": t.read_s,
            "load_create_s": t.create_s,
            **self.c.report(decode_tokens),
        }
