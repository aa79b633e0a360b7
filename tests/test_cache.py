"""The mixed-precision cache's rules and eviction order, as tables."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from dymoe.runtime.cache import (
    HIT,
    MISS,
    PROMOTE,
    Entry,
    Reuse,
    choose_victims,
    classify,
    eviction_order,
    reuse_distance,
)
from dymoe.runtime.resident import Loading, ResidentSet


@pytest.mark.parametrize("resident, requested, want", [
    (None, "int4", MISS),
    ("int4", "int4", HIT),
    ("int8", "int4", HIT),  # a higher copy serves a lower request
    ("fp16", "int2", HIT),
    ("int2", "int4", PROMOTE),  # a lower copy with a higher request is a miss that promotes
    ("int4", "fp16", PROMOTE),
])
def test_classify(resident, requested, want):
    assert classify(Entry(resident, 1) if resident else None, requested) == want


def entries(**spec):
    """k='layer_expert' -> (last_used, uses)"""
    return {tuple(int(x) for x in k[1:].split("_")): Entry("int4", 10, last, uses) for k, (last, uses) in spec.items()}


def test_lru_order_and_victims():
    es = entries(k0_0=(5, 1.0), k0_1=(1, 9.0), k1_0=(3, 0.0))
    assert eviction_order(es, "lru") == [(0, 1), (1, 0), (0, 0)]
    assert choose_victims(es, need=10, budget=40, policy="lru") == []  # fits already
    assert choose_victims(es, need=10, budget=30, policy="lru") == [(0, 1)]
    assert choose_victims(es, need=20, budget=30, policy="lru") == [(0, 1), (1, 0)]
    assert choose_victims(es, need=20, budget=30, policy="lru", protect=[(0, 1)]) == [(1, 0), (0, 0)]
    assert choose_victims(es, need=40, budget=30, policy="lru") is None  # cannot ever fit


def test_priority_eviction_keeps_frequent_and_calibrated_hot_experts():
    es = entries(k0_0=(5, 0.0), k0_1=(1, 3.0), k1_0=(3, 0.0))
    # frequency: (0,1) was used often, so it survives despite being least recent
    assert eviction_order(es, "priority")[0] in {(0, 0), (1, 0)}
    assert eviction_order(es, "priority")[-1] == (0, 1)
    # calibration prior: (1,0) carries 3x the average gate mass
    order = eviction_order(es, "priority", priors={(1, 0): 3.0, (0, 0): 0.1, (0, 1): 0.1})
    assert order == [(0, 0), (0, 1), (1, 0)]


def resident(budget: int, **spec) -> ResidentSet:
    c = ResidentSet(budget=budget, eviction="lru")
    for key, e in entries(**spec).items():
        c.add(key, e.precision, e.cost, session=object()).last_used = e.last_used
    return c


def test_resident_set_counts_loads_in_flight_and_pins():
    c = resident(30, k0_0=(1, 0.0), k0_1=(2, 0.0))
    c.start((2, 0), Loading("int4", 10, Future(), prefetch=True))
    assert c.used == 30
    assert c.victims(10, protect=[]) == [(0, 0)]
    c.get((0, 0)).pinned = True
    assert c.victims(10, protect=[]) == [(0, 1)]
    assert c.victims(10, protect=[(0, 1)]) is None
    c.finish((2, 0))
    assert c.used == 20 and c.victims(10, protect=[]) == []


def test_one_copy_per_expert_and_history_survives_a_promotion():
    c = resident(100, k0_0=(0, 0.0))
    c.touch((0, 0))
    c.add((0, 0), "int8", 20, session="higher")  # the promoted copy replaces the lower one
    assert list(c.resident) == [(0, 0)] and c.used == 20
    assert c.get((0, 0)).session == "higher" and c.get((0, 0)).uses == 1.0


def test_tick_decays_use_counts():
    c = ResidentSet(budget=100, decay=0.5)
    c.add((0, 0), "int4", 10, session=None)
    c.touch((0, 0))
    c.tick()
    c.touch((0, 0))
    assert c.get((0, 0)).uses == pytest.approx(1.5)
    assert c.get((0, 0)).last_used == 1


CYCLE = Reuse(layers=(0, 1, 2, 3), now=1, base_rate=0.25, decay=0.9)


@pytest.mark.parametrize("key, uses, prior, want", [
    # an average expert (rate 0.25 from the prior, 0.25 observed: 2.5 uses at decay 0.9)
    ((2, 0), 2.5, 1.0, 1 + 4 * 3),  # its layer runs next: 1 step, then it sits out 3 tokens on average
    ((1, 0), 2.5, 1.0, 4 + 4 * 3),  # the layer running now comes round last
    ((0, 0), 2.5, 1.0, 3 + 4 * 3),
    ((2, 0), 10.0, 4.0, 1),  # used by every token: only the steps to its layer
    ((2, 0), 0.0, 0.0, 1 + 4 * 999),  # never seen, no prior: the floor rate of 1 in 1000
])
def test_reuse_distance(key, uses, prior, want):
    assert reuse_distance(key, Entry("int4", 1, 0, uses), prior, CYCLE) == pytest.approx(want)


def test_reuse_eviction_keeps_the_layer_that_runs_next():
    # LRU would evict layer 2's entries first (used longest ago), just before layer 2 needs them
    es = entries(k2_0=(1, 2.5), k2_1=(1, 2.5), k1_0=(4, 2.5), k1_1=(4, 2.5))
    assert eviction_order(es, "lru")[:2] == [(2, 0), (2, 1)]
    assert eviction_order(es, "reuse", reuse=CYCLE)[:2] == [(1, 0), (1, 1)]
    # a hot expert of the current layer outlasts a cold one of the next
    es = entries(k2_0=(1, 0.2), k1_0=(4, 9.0))
    assert eviction_order(es, "reuse", reuse=CYCLE) == [(2, 0), (1, 0)]
    with pytest.raises(ValueError, match="layer cycle"):
        eviction_order(es, "reuse")
