"""Table tests for the runtime's pure decisions: ladders, depth schedules, precision choice,
heavy hitters, renormalisation, prefetch targets, budgets and policy resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dymoe.bundle.errors import InputError
from dymoe.runtime.budget import parse_budget
from dymoe.runtime.policy import (
    SKIP,
    choose_precisions,
    cosine_retention,
    critical_count,
    heavy_hitter_counts,
    home_precisions,
    homes_fit,
    parse_ladder,
    plan_from_homes,
    plan_precisions,
    plan_prefetch,
    predicted_experts,
    renormalise,
    step_importance,
    tier_of,
)
from dymoe.runtime.policy_config import resolve, retention_schedule

ALL = ["fp32", "fp16", "int8", "int4", "int2"]


@pytest.mark.parametrize("text, want", [
    ("4/2", ["int4", "int2"]),
    ("4/0", ["int4", SKIP]),
    ("8/4/2", ["int8", "int4", "int2"]),
    ("fp16/4/0", ["fp16", "int4", SKIP]),
    ("16/8/4/2/0", ["fp16", "int8", "int4", "int2", SKIP]),
    ("fp32", ["fp32"]),
    (" INT4 / int2 ", ["int4", "int2"]),
])
def test_parse_ladder(text, want):
    assert parse_ladder(text, ALL) == want


@pytest.mark.parametrize("text, available, needle", [
    ("2/4", ALL, "high to low"),
    ("4/4", ALL, "high to low"),
    ("0/4", ALL, "start with a precision"),
    ("3/2", ALL, "not a precision"),
    ("fp16/4", ["fp32", "int4"], "needs fp16"),
])
def test_parse_ladder_rejects(text, available, needle):
    with pytest.raises(InputError, match=needle):
        parse_ladder(text, available)


@pytest.mark.parametrize("layer, layers, r_max, r_min, want", [
    (0, 8, 1.0, 0.5, 1.0),
    (7, 8, 1.0, 0.5, 0.5),
    (0, 1, 0.9, 0.5, 0.9),
    (2, 5, 1.0, 0.0, 0.5),  # the midpoint of the half cosine
    (1, 5, 1.0, 0.0, (1 + math.cos(math.pi / 4)) / 2),
])
def test_cosine_retention(layer, layers, r_max, r_min, want):
    assert cosine_retention(layer, layers, r_max, r_min) == pytest.approx(want)


def test_cosine_retention_decays_monotonically():
    rs = [cosine_retention(layer, 12, 1.0, 0.25) for layer in range(12)]
    assert all(a >= b for a, b in zip(rs[:-1], rs[1:], strict=True))


@pytest.mark.parametrize("rank, count, r, tiers, want", [
    (0, 2, 0.5, 2, 0), (1, 2, 0.5, 2, 1),  # top-2, r 0.5: one critical
    (1, 2, 0.75, 2, 1),  # floor(1.5) = 1 critical: retention is never rounded up
    (1, 2, 1.0, 2, 0),  # r 1: everything critical
    (0, 2, 0.1, 2, 0),  # at least one expert stays critical
    (5, 8, 0.75, 2, 0), (6, 8, 0.75, 2, 1),  # Qwen3 top-8: 6 critical
    (0, 8, 0.25, 3, 0), (2, 8, 0.25, 3, 1), (4, 8, 0.25, 3, 1), (5, 8, 0.25, 3, 2), (7, 8, 0.25, 3, 2),
    (3, 4, 0.5, 1, 0),  # a one-step ladder puts everything on it
])
def test_tier_of(rank, count, r, tiers, want):
    assert tier_of(rank, count, r, tiers) == want


@pytest.mark.parametrize("r, count, want", [
    (0.5, 2, 1), (0.75, 2, 1), (1.0, 2, 2), (0.01, 2, 1), (0.75, 8, 6), (0.3, 8, 2), (1.0, 1, 1), (0.999, 4, 3),
])
def test_critical_count(r, count, want):
    assert critical_count(r, count) == want


def test_step_importance_decode_is_the_gate_score():
    got = step_importance("decode", np.array([[3, 5]]), np.array([[0.7, 0.3]], np.float32), np.ones(4), 0.1)
    assert got == pytest.approx({3: 0.7, 5: 0.3})


def test_step_importance_prefill_counts_heavy_hitters_then_gate_mass():
    # token 2 holds the most attention: its experts (1 and 4) are the important ones
    experts = np.array([[0, 4], [0, 2], [1, 4], [0, 2]])
    weights = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], np.float32)
    colsum = np.array([0.1, 0.2, 3.0, 0.4])
    got = step_importance("prefill", experts, weights, colsum, heavy_fraction=0.25)
    assert sorted(got, key=got.get, reverse=True)[:2] == [4, 1]  # heavy hitters beat any gate mass
    assert got[0] > got[2]  # then gate mass: 2.4 vs 0.5
    assert all(0 <= got[e] < 1 for e in (0, 2)) and all(1 <= got[e] < 2 for e in (1, 4))


@pytest.mark.parametrize("importance, r, ladder, want", [
    ({7: 0.6, 2: 0.4}, 0.5, ["int4", "int2"], {7: "int4", 2: "int2"}),
    ({7: 0.6, 2: 0.4}, 1.0, ["int4", SKIP], {7: "int4", 2: "int4"}),
    ({7: 0.6, 2: 0.4}, 0.5, ["fp16"], {7: "fp16", 2: "fp16"}),
    ({1: 0.1, 2: 0.5, 3: 0.2, 4: 0.9}, 0.5, ["int8", "int4", SKIP], {4: "int8", 2: "int8", 3: "int4", 1: SKIP}),
])
def test_plan_precisions(importance, r, ladder, want):
    assert plan_precisions(importance, r, ladder) == want


@pytest.mark.parametrize("scores, m, r, ladder, want", [
    # decode: one token's scores, top-2 predicted, the likelier one critical
    ([[0.1, 0.6, 0.05, 0.25]], 2, 0.5, ["int4", "int2"], {1: "int4", 3: "int2"}),
    # the skipped step needs no load
    ([[0.1, 0.6, 0.05, 0.25]], 2, 0.5, ["int4", SKIP], {1: "int4"}),
    # prefill: the union over tokens, likeliest overall first (the caller affords what it can)
    ([[0.5, 0.4, 0.05, 0.05], [0.05, 0.4, 0.5, 0.05]], 2, 1.0, ["int4"], {1: "int4", 0: "int4", 2: "int4"}),
    # DeepSeek-V3: masked groups (-inf) are never fetched
    ([[-np.inf, 0.9, -np.inf, 0.3]], 3, 1.0, ["int8", "int4"], {1: "int8", 3: "int8"}),
])
def test_plan_prefetch(scores, m, r, ladder, want):
    got = plan_prefetch(np.array(scores), m, r, ladder)
    assert got == want and list(got) == list(want)  # in order, likeliest first


KEYS = [(0, 0), (0, 1), (1, 0), (1, 1)]
HOT = {(0, 0): 2.0, (0, 1): 0.5, (1, 0): 1.5, (1, 1): 0.1}
COST = {"int8": 4, "int4": 2, "int2": 1}


@pytest.mark.parametrize("capacity, want", [
    # everything at int8 fits
    (16, {(0, 0): "int8", (0, 1): "int8", (1, 0): "int8", (1, 1): "int8"}),
    # all at int4 (8) and room for two upgrades of 2: the two hottest
    (12, {(0, 0): "int8", (0, 1): "int4", (1, 0): "int8", (1, 1): "int4"}),
    (11, {(0, 0): "int8", (0, 1): "int4", (1, 0): "int4", (1, 1): "int4"}),
    # everyone up one step before anyone takes two
    (7, {(0, 0): "int4", (0, 1): "int4", (1, 0): "int4", (1, 1): "int2"}),
    (4, {k: "int2" for k in KEYS}),
    # not even int2 for all: homes one step above the lowest (critical int4, the rest int2)
    (3, {k: "int4" for k in KEYS}),
])
def test_home_precisions(capacity, want):
    assert home_precisions(KEYS, HOT, ["int8", "int4", "int2"], COST, capacity) == want


def test_home_precisions_without_priors_go_in_key_order():
    got = home_precisions(KEYS, {}, ["int4", "int2"], COST, 6)
    assert got == {(0, 0): "int4", (0, 1): "int4", (1, 0): "int2", (1, 1): "int2"}


@pytest.mark.parametrize("importance, r, homes, want", [
    # the critical expert at its home, the other one step lower
    ({3: 0.7, 5: 0.3}, 0.5, {3: "int8", 5: "int8"}, {3: "int8", 5: "int4"}),
    ({3: 0.7, 5: 0.3}, 0.5, {3: "int4", 5: "int8"}, {3: "int4", 5: "int4"}),
    # never below the ladder's last step
    ({3: 0.7, 5: 0.3}, 0.5, {3: "int2", 5: "int2"}, {3: "int2", 5: "int2"}),
    # r = 1: everyone critical
    ({3: 0.7, 5: 0.3}, 1.0, {3: "int4", 5: "int2"}, {3: "int4", 5: "int2"}),
])
def test_plan_from_homes(importance, r, homes, want):
    assert plan_from_homes(importance, r, ["int8", "int4", "int2"], homes) == want


@pytest.mark.parametrize("importance, r, ladder, homes, want", [
    # every expert fits at its home: the non-critical one asks for its home too, not a lower copy
    ({3: 0.7, 5: 0.3}, 0.5, ["int8", "int4", "int2"], {3: "int8", 5: "int4"}, {3: "int8", 5: "int4"}),
    ({3: 0.7, 5: 0.3, 6: 0.1}, 0.34, ["int8", "int4", "int2"], {3: "int4", 5: "int4", 6: "int8"},
     {3: "int4", 5: "int4", 6: "int8"}),
    # a skip in the ladder is the user's choice to save compute: it stays
    ({1: 0.9, 2: 0.1}, 0.5, ["int4", SKIP], {1: "int4", 2: "int4"}, {1: "int4", 2: SKIP}),
])
def test_plan_from_homes_when_all_fit(importance, r, ladder, homes, want):
    assert plan_from_homes(importance, r, ladder, homes, all_fit=True) == want
    # without the room, the same step would go lower
    assert plan_from_homes(importance, r, ladder, homes) != want or SKIP in want.values()


@pytest.mark.parametrize("homes, capacity, fit", [
    ({(0, 0): "int4", (0, 1): "int8"}, 30, True),
    ({(0, 0): "int4", (0, 1): "int8"}, 29, False),
    ({}, 0, True),
])
def test_homes_fit(homes, capacity, fit):
    assert homes_fit(homes, {"int8": 20, "int4": 10, "int2": 6}, capacity) is fit


def test_plan_from_homes_can_end_in_skip():
    assert plan_from_homes({1: 0.9, 2: 0.1}, 0.5, ["int4", "int2", SKIP], {1: "int2", 2: "int2"}) == \
        {1: "int2", 2: SKIP}


@pytest.mark.parametrize("importance, r, ladder, want", [
    ([0.7, 0.3], 0.5, ["int4", "int2"], ["int4", "int2"]),
    ([0.3, 0.7], 0.5, ["int4", "int2"], ["int2", "int4"]),  # order follows importance, not position
    ([0.3, 0.7], 0.5, ["int4", SKIP], [SKIP, "int4"]),
    ([0.3, 0.7], 1.0, ["int4", SKIP], ["int4", "int4"]),
    ([0.5, 0.5], 0.5, ["int4", "int2"], ["int4", "int2"]),  # ties: stable, first wins
    ([3, 0, 5, 1], 0.5, ["int8", "int4", "int2"], ["int8", "int2", "int8", "int4"]),
])
def test_choose_precisions(importance, r, ladder, want):
    assert choose_precisions(importance, r, ladder) == want


def test_heavy_hitters_count_tokens_with_most_attention():
    colsum = np.array([9.0, 1.0, 8.0, 0.5, 0.1])  # tokens 0 and 2 are heavy hitters at 40 %
    experts = np.array([[0, 1], [2, 3], [0, 2], [3, 1], [1, 0]])
    assert heavy_hitter_counts(colsum, experts, 0.4) == {0: 2, 1: 1, 2: 1}
    # decode-style call: colsum covers the cache, experts only the newest token
    assert heavy_hitter_counts(np.array([5.0, 1.0, 2.0]), np.array([[4, 6]]), 0.1) == {4: 1, 6: 1}


@pytest.mark.parametrize("weights, kept, want", [
    ([[0.6, 0.4]], [[True, False]], [[1.0, 0.0]]),
    ([[0.3, 0.2]], [[True, False]], [[0.5, 0.0]]),  # total kept as it was (norm_topk_prob off)
    ([[0.6, 0.4]], [[False, False]], [[0.0, 0.0]]),
    ([[0.6, 0.4]], [[True, True]], [[0.6, 0.4]]),
])
def test_renormalise(weights, kept, want):
    got = renormalise(np.array(weights, np.float32), np.array(kept))
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_predicted_experts_union_of_token_top_m_ordered_by_score_mass():
    scores = np.array([[0.5, 0.4, 0.05, 0.05], [0.05, 0.4, 0.5, 0.05]])  # a softmax router's probabilities
    assert predicted_experts(scores, 1) == [0, 2]  # equal mass: by index
    assert predicted_experts(scores, 2) == [1, 0, 2]  # expert 1: 0.4 + 0.4 beats 0.5 + 0.05
    assert predicted_experts(scores[:1], 2) == [0, 1]
    # DeepSeek-V3's masked groups are -inf: never predicted, never summed
    masked = np.array([[0.9, -np.inf, 0.2, -np.inf]])
    assert predicted_experts(masked, 3) == [0, 2]


@pytest.mark.parametrize("text, want", [
    ("600MiB", 600 * 2**20), ("1.5GB", 1_500_000_000), ("800M", 800_000_000), ("25%", 250), ("100%", 1000),
    ("4096B", 4096), (" 2 GiB ", 2 * 2**30),
])
def test_parse_budget(text, want):
    assert parse_budget(text, 1000) == want


@pytest.mark.parametrize("text", ["0%", "150%", "lots", "12 parsecs", "-5MiB", "%"])
def test_parse_budget_rejects(text):
    with pytest.raises(InputError, match="--budget"):
        parse_budget(text, 1000)


def test_a_bare_number_budget_needs_a_unit():
    with pytest.raises(InputError, match="no unit") as e:
        parse_budget("25", 1000)
    assert "25%" in e.value.hint and "25MiB" in e.value.hint


@pytest.mark.parametrize("name, ladder, cache, prefetch", [
    ("ondemand", ["fp16"], False, 0),
    ("lru", ["fp16"], True, 0),
    ("lru-prefetch", ["fp16"], True, 1),
    ("static-int4", ["int4"], True, 0),
    ("static-int2", ["int2"], True, 0),
    ("dymoe", ["int8", "int4", "int2"], True, 1),
])
def test_presets(name, ladder, cache, prefetch):
    cfg = resolve(name, ["fp16", "int8", "int4", "int2"])
    assert (cfg.ladder, cfg.cache, cfg.prefetch) == (ladder, cache, prefetch)


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('ladder = "8/4/0"\nretention = 0.75\nschedule = "constant"\nprefetch = 2\n')
    cfg = resolve("dymoe", ALL, f, retention=0.25, prefetch=None)
    assert cfg.ladder == ["int8", "int4", SKIP] and cfg.retention == 0.25 and cfg.prefetch == 2
    assert retention_schedule(cfg, 3) == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("content, needle", [
    ('colour = "blue"\n', "unknown key 'colour'"),
    ("prefetch = 3\n", "prefetch depth"),
    ('schedule = "linear"\n', "schedule"),
    ("retention = 0\n", "retention"),
    ("ladder = [\n", "not valid TOML"),
])
def test_config_file_errors(tmp_path, content, needle):
    f = tmp_path / "p.toml"
    f.write_text(content)
    with pytest.raises(InputError, match=needle):
        resolve("dymoe", ALL, f)


def test_unknown_policy_and_calibrated_schedule_without_calibration():
    with pytest.raises(InputError, match="unknown policy 'fastest'"):
        resolve("fastest", ALL)
    cfg = resolve("dymoe", ALL, schedule="calibrated")
    with pytest.raises(InputError, match="calibrate"):
        retention_schedule(cfg, 4, None)
