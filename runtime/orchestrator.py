"""The DyMoE expert executor: it runs each MoE layer's step under a memory budget. The decisions
are pure functions of ``policy`` (which precision each selected expert gets, what to prefetch)
and ``cache`` (hit, miss or promotion; what to evict); the books are the ``ResidentSet``'s; the
events go to an observer (``RunCounters``). This module only performs: it asks the loader,
waits when it must (a stall), and runs the expert sessions.

A step is pipelined: every missing expert's load is queued at once (most important first, ahead
of any prefetch), the resident experts run while those loads are read and built on the loader's
threads, and each loaded expert runs as soon as it lands. Outputs are summed in expert order,
so results do not depend on which load finished first.

T tokens of the step, H hidden, k experts per token, E experts per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.completions import Completions
from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.precisions import RANK, SKIP

from .bundle import Bundle
from .cache import HIT, PROMOTE, Key, Reuse, classify
from .costs import EngineCosts
from .counters import RunCounters
from .experts import LayerStep, accumulate, groups
from .loader import DEMAND, PREFETCH, Loaded, Loader, LoadTotals
from .memory import HeapGovernor
from .policy import (
    capped,
    home_precisions,
    homes_fit,
    minimum_working_set,
    plan_from_homes,
    plan_precisions,
    plan_prefetch,
    renormalise,
    step_importance,
)
from .policy_config import PolicyConfig
from .predictor import Predictor
from .resident import Loading, ResidentSet


def check_budget(config: PolicyConfig, costs: EngineCosts, budget: int, top_k: int) -> None:
    need = minimum_working_set(config.ladder, costs.resident, costs.scratch, top_k)
    if budget < need:
        lowest = min((p for p in config.ladder if p != SKIP), key=RANK.get)
        raise InputError(
            f"budget {budget / 2**20:.1f} MiB is below the minimum working set {need / 2**20:.1f} MiB "
            f"(one layer's top-{top_k} experts at {lowest} and one more being built, policy {config.name})",
            "raise --budget, or use a lower-precision ladder",
        )


class Orchestrator:
    def __init__(self, bundle: Bundle, config: PolicyConfig, loader: Loader, costs: EngineCosts, budget: int,
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
        self.memory = HeapGovernor(budget)
        self.priors = priors or {}
        self.homes: dict[Key, str] | None = None  # each expert's highest precision (fit_precisions)
        self.homes_fit = False  # and every expert fits at its home: no lower copies (policy.plan_from_homes)
        self._pool: ThreadPoolExecutor | None = None  # prefill's expert threads (compute_threads)
        self._settled = False  # every expert resident at the most it is ever asked for: nothing to prefetch
        layers = tuple(self.spec.moe_layers)
        self.resident.reuse = Reuse(layers, layers[0], self.spec.top_k / self.spec.num_experts, self.resident.decay)
        check_budget(config, costs, budget, self.spec.top_k)

    def start(self) -> None:
        """The backbone is loaded: note the base footprint, plan the experts' home precisions, then
        pin calibration's hot experts."""
        self.memory.start()
        if self.config.fit_precisions:
            steps = [p for p in self.config.ladder if p != SKIP]
            # leave room for the loads in flight (each holds its engine and build scratch)
            capacity = self.resident.budget - self.loader.workers * max(self.costs.in_flight(p) for p in steps)
            keys = [(layer, e) for layer in self.spec.moe_layers for e in range(self.spec.num_experts)]
            self.homes = home_precisions(keys, self.priors, self.config.ladder, self.costs.resident, capacity)
            self.homes_fit = homes_fit(self.homes, self.costs.resident, capacity)
        if self.config.pin_fraction > 0 and self.priors:
            self._pin_hot(self.priors)

    def _pin_hot(self, priors: dict[Key, float]) -> None:
        """Load and pin the experts calibration found hottest, up to pin_fraction of the budget."""
        room = int(self.config.pin_fraction * self.resident.budget)
        for key in sorted(priors, key=lambda k: (-priors[k], k)):
            p = self.config.ladder[0] if self.homes is None else capped(self.config.ladder[0], self.homes[key])
            if self.costs.resident[p] > room:
                break
            self.memory.before_load(self.costs.in_flight(p))
            self._insert(self.loader.load(key[0], key[1], p), prefetch=False).pinned = True
            room -= self.costs.resident[p]

    # --- the ExpertExecutor interface ---------------------------------------------------

    def run(self, step: LayerStep) -> np.ndarray:
        if step.layer == self.spec.moe_layers[0]:
            self.resident.tick()
            # once settled, every request is a hit: nothing loads or leaves, so it stays settled
            self._settled = self._settled or self._everything_resident()
        self._land_finished()
        decode = step.phase == "decode"
        importance = step_importance(step.phase, step.experts, step.weights, step.attn_colsum,
                                     self.config.heavy_fraction)
        wanted = self._plan(step.layer, importance)
        self.resident.reuse = dataclasses.replace(self.resident.reuse, now=step.layer)
        self._account_prediction(step)
        self._cancel_stale(step.layer, {e for e, p in wanted.items() if p != SKIP})
        weights = step.weights
        kept = ~np.isin(step.experts, [e for e, p in wanted.items() if p == SKIP])
        if self.config.renormalize and not kept.all():
            weights = renormalise(weights, kept)
        for p in wanted.values():
            self.c.planned(step.layer, p)
        self.c.skip(sum(p == SKIP for p in wanted.values()))

        protect = {(step.layer, e) for e in wanted}  # this layer's experts stay while it runs
        order = sorted((e for e, p in wanted.items() if p != SKIP), key=lambda e: (-importance[e], e))
        ready: dict[int, object] = {}  # expert -> session to run now
        pending: dict[Future, int] = {}  # a load in flight -> the expert waiting for it
        deferred: list[int] = []  # no room to load beside the others: load after they ran
        for e in order:
            got = self._request((step.layer, e), wanted[e], protect)
            if isinstance(got, Future):
                pending[got] = e
            elif got is None:
                deferred.append(e)
            else:
                ready[e] = got
        if self.config.prefetch and self.predictor is not None and not self._settled:
            self._prefetch(step)

        x = step.router_input
        grouped = list(groups(step))
        tokens = {e: tok for e, tok, _ in grouped}
        outputs: dict[int, np.ndarray] = {}
        # a prompt's experts are independent matmuls on their own tokens: run them side by side
        pool = self._compute_pool() if step.phase == "prefill" else None
        running: dict[Future, int] = {}

        def forward(e: int, session) -> None:
            if pool is not None:
                running[pool.submit(session.run, [io.EXPERT_OUT], {io.EXPERT_IN: x[tokens[e]]})] = e
                return
            outputs[e] = session.run([io.EXPERT_OUT], {io.EXPERT_IN: x[tokens[e]]})[0]
            if not self.config.cache:
                self.resident.evict((step.layer, e))

        for e, session in ready.items():
            forward(e, session)
        arrivals = Completions(pending) if pending else None  # not concurrent.futures.wait: see its module
        while pending:
            t = time.perf_counter()
            future = arrivals.next()
            self.c.stall(time.perf_counter() - t, decode)
            e = pending.pop(future)
            forward(e, self._collect((step.layer, e), wanted[e]))
        for e in deferred:
            t = time.perf_counter()
            session = self._load_now((step.layer, e), wanted[e], protect - {(step.layer, d) for d in outputs}).session
            self.c.stall(time.perf_counter() - t, decode)
            forward(e, session)
        for future, e in running.items():
            outputs[e] = future.result()[0]
            if not self.config.cache:
                self.resident.evict((step.layer, e))
        return accumulate(step, outputs, weights, grouped)

    def _compute_pool(self) -> ThreadPoolExecutor | None:
        if self.config.compute_threads <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.compute_threads, thread_name_prefix="dymoe-expert")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.loader.close()
        self.resident.resident.clear()
        self.resident.loading.clear()

    def _everything_resident(self) -> bool:
        """Every expert is resident at the highest precision it can be asked for (its home, or the
        ladder's top): a look-ahead could only find hits, so its router calls are skipped."""
        resident = self.resident.resident
        if len(resident) < len(self.spec.moe_layers) * self.spec.num_experts or self.resident.loading:
            return False
        top = self.config.ladder[0]
        return all(RANK[r.precision] >= RANK[top if self.homes is None else self.homes[k]]
                   for k, r in resident.items())

    def _plan(self, layer: int, importance: dict[int, float]) -> dict[int, str]:
        r = self.retention[layer]
        if self.homes is None:
            return plan_precisions(importance, r, self.config.ladder)
        return plan_from_homes(importance, r, self.config.ladder, {e: self.homes[(layer, e)] for e in importance},
                               self.homes_fit)

    def _cap(self, layer: int, wanted: dict[int, str]) -> dict[int, str]:
        if self.homes is None:
            return wanted
        return {e: capped(p, self.homes[(layer, e)], self.homes_fit) for e, p in wanted.items()}

    # --- one expert's request -----------------------------------------------------------

    def _request(self, key: Key, precision: str, protect: set[Key]):
        """A session to run now, a Future of the load to wait for, or None (load later)."""
        loading = self.resident.loading.get(key)
        if loading is not None and RANK[loading.precision] >= RANK[precision]:
            self.c.hit(key, loading.prefetch)  # a prefetch got here first; it may still stall
            if loading.prefetch and self.loader.cancel(loading.future):  # still queued: move it ahead
                loading.future = self.loader.submit(key[0], key[1], loading.precision, DEMAND)
            loading.prefetch = False
            return loading.future
        if loading is not None:  # a lower copy is on its way: take it, then ask again
            t = time.perf_counter()
            self._land(key)  # a failure here is retried below like a miss
            self.c.stall(time.perf_counter() - t, True)
        resident = self.resident.get(key)
        kind = classify(resident, precision)
        if kind == HIT:
            self.c.hit(key, resident.prefetched)
            self.resident.touch(key)
            return resident.session
        if kind == PROMOTE and self.config.serve_lower_while_promoting:
            self.c.miss(promotion=True, served_lower=True)
            self._start_load(key, precision, PREFETCH, protect)
            self.resident.touch(key)
            return resident.session
        self.c.miss(promotion=kind == PROMOTE)
        if kind == PROMOTE:
            self.resident.evict(key)  # we wait for the higher copy anyway: free the lower one first
        started = self._start_load(key, precision, DEMAND, protect)
        return self.resident.loading[key].future if started else None

    def _collect(self, key: Key, precision: str):
        """Wait for ``key``'s load, make it resident, and return its session (falling back to
        another precision, if the policy allows, when the load failed)."""
        loaded = self._land(key)
        if isinstance(loaded, DymoeError):
            t = time.perf_counter()
            self.resident.evict(key)
            loaded = self._fallback(key, precision, loaded)
            self._insert(loaded, prefetch=False)
            self.c.stall(time.perf_counter() - t, True)
        self.resident.touch(key)
        return loaded.session

    # --- look-ahead ---------------------------------------------------------------------

    def _account_prediction(self, step: LayerStep) -> None:
        predicted = self.predicted.pop(step.layer, None)
        if predicted is not None and step.phase == "decode":
            self.c.prediction(predicted, {int(e) for e in np.unique(step.experts)})

    def _cancel_stale(self, layer: int, wanted: set[int]) -> None:
        """Prefetches not yet started for this layer's unselected experts, or for layers already
        passed, will not be used in time: drop them and free their reservation."""
        for key, loading in list(self.resident.loading.items()):
            stale = key[0] < layer or (key[0] == layer and key[1] not in wanted)
            if loading.prefetch and stale and self.loader.cancel(loading.future):
                self.resident.finish(key)
                self.c.cancelled()

    def _prefetch(self, step: LayerStep) -> None:
        """Start loading what the next MoE layers' routing rules pick on this layer's state."""
        current = {(step.layer, int(e)) for e in np.unique(step.experts)}
        x = step.router_input[-1:] if step.phase == "decode" else step.router_input
        m = self.config.prefetch_top or self.spec.top_k
        for ahead in range(1, self.config.prefetch + 1):
            target = self.predictor.ahead(step.layer, ahead)
            if target is None:
                break
            wants = self._cap(target, plan_prefetch(self.predictor.scores(target, x), m, self.retention[target],
                                                    self.config.ladder))
            if ahead == 1:
                self.predicted[target] = set(wants)
            protect = current | {(target, e) for e in wants}
            for i, (e, p) in enumerate(wants.items()):
                key = (target, e)
                if classify(self.resident.get(key), p) == HIT or key in self.resident.loading:
                    continue
                # beyond the m likeliest (a prompt predicts most of a layer), load only into free room
                if self._start_load(key, p, PREFETCH + ahead - 1, protect, evict=i < m):
                    self.c.prefetch()

    # --- loading --------------------------------------------------------------------------

    def _start_load(self, key: Key, precision: str, priority: int, protect: set[Key], evict: bool = True) -> bool:
        """Queue a load; the budget holds the engine and its build scratch until it lands. A
        lower copy stays resident (and usable) meanwhile, so both count. ``evict=False``: only
        if it fits without evicting anything."""
        if key in self.resident.loading:
            return True
        cost = self.costs.in_flight(precision)
        victims = self.resident.victims(cost, protect | {key})
        if victims is None or (victims and not evict):
            return False
        for v in victims:
            self.resident.evict(v)
        self.memory.before_load(cost)
        future = self.loader.submit(key[0], key[1], precision, priority)
        self.resident.start(key, Loading(precision, cost, future, priority != DEMAND))
        self.c.resident(self.resident.used)
        return True

    def _land_finished(self) -> None:
        for key in self.resident.finished():
            if isinstance(error := self._land(key), DymoeError):  # whoever needs it will load it again
                self.note(f"background load of expert {key[1]} in layer {key[0]} failed: {error.message}")

    def _land(self, key: Key) -> Loaded | DymoeError:
        """Wait for ``key``'s load and make it resident; a failed load raises, or with
        ``on_load_error = "fallback"`` returns the error for the caller to handle."""
        loading = self.resident.finish(key)  # single-threaded books: nothing decides while we wait
        try:
            loaded = loading.future.result()
        except DymoeError as e:
            self.c.load_error()
            if self.config.on_load_error != "fallback":
                raise
            return e
        self._insert(loaded, loading.prefetch)
        return loaded

    def _insert(self, loaded: Loaded, prefetch: bool):
        r = self.resident.add((loaded.layer, loaded.expert), loaded.precision,
                              self.costs.resident[loaded.precision], loaded.session, prefetched=prefetch)
        self.memory.before_load(0)  # the load's scratch is free now
        self.resident.reserve = self.memory.observe()
        self.c.resident(self.resident.used)
        return r

    def _load_now(self, key: Key, precision: str, protect: set[Key]) -> Loaded:
        """Load in this thread (nothing else could make room earlier)."""
        self.resident.evict(key)
        cost = self.costs.in_flight(precision)
        victims = self.resident.victims(cost, protect)
        if victims is None:
            # the rest of the budget is held by this layer's other experts: let them go
            victims = self.resident.victims(cost, ()) or []
        for v in victims:
            self.resident.evict(v)
        self.memory.before_load(cost)
        try:
            loaded = self.loader.load(key[0], key[1], precision)
        except DymoeError as e:
            self.c.load_error()
            if self.config.on_load_error != "fallback":
                raise
            loaded = self._fallback(key, precision, e)
        self._insert(loaded, prefetch=False)
        self.resident.touch(key)
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

    def begin(self) -> tuple[RunCounters, LoadTotals]:
        """A new generation starts: a copy of the counters to report it apart from earlier ones
        (the cache stays warm), and its peak resident bytes start from what is resident now."""
        self.c.peak_resident = self.resident.used
        return copy.deepcopy(self.c), dataclasses.replace(self.loader.totals)

    def report(self, decode_tokens: int, decode_bytes: int,
               since: tuple[RunCounters, LoadTotals] | None = None) -> dict:
        """The run's metrics; with ``since`` (from :meth:`begin`), those of one generation."""
        c, t = self.c, self.loader.totals
        if since is not None:
            c = c.since(since[0])
            t = LoadTotals(**{f.name: getattr(t, f.name) - getattr(since[1], f.name)
                              for f in dataclasses.fields(LoadTotals)})
        return {
            "policy": self.config.name,
            "policy_config": dict(vars(self.config)),
            "retention_by_layer": self.retention,
            "budget_bytes": self.resident.budget,
            "resident_cost_bytes": self.costs.resident,
            "build_scratch_bytes": self.costs.scratch,
            "storage": self.loader.storage.label,
            "emulated_storage": self.loader.storage.profile is not None,
            "storage_reads": self.loader.storage.reads,  # emulated reads in the run so far
            "storage_slower_than_profile": self.loader.storage.slower_than_profile,
            "bytes_read": t.bytes_read,
            "bytes_read_per_token": decode_bytes / decode_tokens,
            "loads": t.loads,
            "load_read_s": t.read_s,
            "load_create_s": t.create_s,
            "load_busy_s": t.busy_s,
            "load_throughput_bytes_per_s": t.bytes_read / t.busy_s if t.busy_s else None,
            "memory_base_bytes": self.memory.base,
            "heap_trims": self.memory.trims,
            "memory_reserve_bytes": self.memory.reserve,
            "peak_rss_above_base_bytes": self.memory.peak,
            **c.report(decode_tokens),
        }
