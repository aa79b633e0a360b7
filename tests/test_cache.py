"""The mixed-precision cache's rules and eviction order, as tables."""

from __future__ import annotations

import pytest

from dymoe.runtime.cache import HIT, MISS, PROMOTE, CacheState, Entry, choose_victims, classify, eviction_order


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


def test_cache_state_counts_reservations_and_pins():
    c = CacheState(budget=30, policy="lru")
    c.entries = entries(k0_0=(1, 0.0), k0_1=(2, 0.0))
    c.reserved[(2, 0)] = 10
    assert c.used == 30
    assert c.make_room(10, protect=[]) == [(0, 0)]
    c.pinned.add((0, 0))
    assert c.make_room(10, protect=[]) == [(0, 1)]
    assert c.make_room(10, protect=[(0, 1)]) is None


def test_tick_decays_use_counts():
    c = CacheState(budget=100, decay=0.5)
    c.entries = entries(k0_0=(0, 0.0))
    c.touch((0, 0))
    c.tick()
    c.touch((0, 0))
    assert c.entries[(0, 0)].uses == pytest.approx(1.5)
    assert c.entries[(0, 0)].last_used == 1
