"""``dymoe info --plan``: the memory split is a pure function (table-tested here), the sizes given on
the command line need a unit, and the CLI prints the plan of a real bundle."""

from __future__ import annotations

import dataclasses

import pytest
from test_manifest import make_manifest
from test_safety import assert_clean_error, dymoe

from dymoe.bundle.errors import InputError
from dymoe.runtime.device_memory import PREPACKED, RUNTIME_RESERVE, backbone_bytes
from dymoe.runtime.plan import DEFAULT_CONTEXT, PlanFacts, facts_of, make_plan, parse_memory

FACTS = PlanFacts(model="m", backbone_precision="int8", backbone_bytes=1000, kv_bytes_per_token=10, max_context=1000,
                  moe_layers=2, experts_per_layer=4, top_k=2, resident_bytes={"int8": 100, "int4": 50},
                  file_bytes={"int8": 90, "int4": 45})

# memory, context, reserve -> expert budget, {precision: (experts that fit, bytes read per token)}, fits
PLANS = [
    # half of the 8 experts fit at int8 (hit rate 1/2: each token reads half of its 2 x 2 experts), all at int4
    (2600, 100, 200, 400, {"int8": (4, 180), "int4": (8, 0)}, True),
    # exactly one layer's top-2 at int4, one expert at int8
    (2200, 100, 100, 100, {"int8": (1, 315), "int4": (2, 135)}, True),
    # room for more experts than there are: capped at all 8
    (10_000, 100, 200, 7800, {"int8": (8, 0), "int4": (8, 0)}, True),
    # the backbone, KV cache and reserve alone take more than the memory: nothing fits, a run is refused
    (1500, 100, 200, -700, {"int8": (0, 360), "int4": (0, 180)}, False),
    # below one layer's top-2 at the cheapest precision
    (2199, 100, 100, 99, {"int8": (0, 360), "int4": (1, 158)}, False),
]


@pytest.mark.parametrize("memory,context,reserve,budget,rows,fits", PLANS)
def test_plan_splits_memory(memory, context, reserve, budget, rows, fits):
    p = make_plan(FACTS, memory, context, reserve)
    assert (p.kv_bytes, p.reserve, p.expert_budget, p.fits) == (10 * context, reserve, budget, fits)
    assert {r.precision: (r.experts_fit, r.read_per_token) for r in p.rows} == rows
    for r in p.rows:
        assert r.share == r.experts_fit / 8 and r.expert_bytes == FACTS.resident_bytes[r.precision]
        assert r.read_ms_per_token is None


def test_plan_context_defaults_to_the_smaller_of_4096_and_the_model():
    assert make_plan(FACTS, 10**6).context == 1000
    assert make_plan(dataclasses.replace(FACTS, max_context=40_960), 10**6).context == DEFAULT_CONTEXT == 4096
    assert make_plan(FACTS, 10**6).reserve == RUNTIME_RESERVE


@pytest.mark.parametrize("context", [0, 1001, -5])
def test_plan_refuses_a_context_the_model_cannot_hold(context):
    with pytest.raises(InputError, match="--context"):
        make_plan(FACTS, 10**6, context)


def test_plan_turns_bytes_read_into_milliseconds_at_the_storage_speed():
    p = make_plan(FACTS, 2600, 100, 200, storage_mb_per_s=1e-3)  # 1,000 bytes per second
    assert [r.read_ms_per_token for r in p.rows] == pytest.approx([180.0, 0.0])  # 180 bytes: 0.18 s


@pytest.mark.parametrize("text,value", [
    ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("16 gib", 16 * 2**30), ("1.5TB", 15 * 10**11),
    ("512MiB", 512 * 2**20), (" 8 GB ", 8 * 10**9), ("100kB", 10**5), ("3KiB", 3072), ("7b", 7),
])
def test_memory_sizes_with_units(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text,needle", [
    ("16", "has no unit"), ("16G", "unknown unit 'G'"), ("16 gigs", "unknown unit"), ("GB", "is not a size"),
    ("-1GB", "is not a size"), ("", "is not a size"), ("0GB", "more than 0"), ("1e3GB", "is not a size"),
])
def test_memory_sizes_without_a_clear_unit_are_refused(text, needle):
    with pytest.raises(InputError) as e:
        parse_memory(text)
    assert needle in e.value.message and "16GB" in e.value.hint and "16GiB" in e.value.hint


def _with_backbone(**fields):
    m = make_manifest()
    m.backbone = dataclasses.replace(m.backbone, **fields)
    return m


def test_backbone_resident_counts_external_data_and_fp16_upcasts():
    sizes = {r: e.bytes for r, e in make_manifest().files.items()}
    graphs = sum(sizes[r] for r in make_manifest().backbone.graphs())
    layers = sizes["backbone/layer0.onnx"] + sizes["backbone/layer1.onnx"]
    data = sizes["backbone/embed.onnx.data"]
    assert backbone_bytes(make_manifest()) == graphs
    assert backbone_bytes(_with_backbone(external_data={"backbone/embed.onnx": ["backbone/embed.onnx.data"]})) \
        == graphs + data
    # ORT folds an fp16 linear's Cast into a float32 copy; the fp16 embedding table stays fp16
    assert backbone_bytes(_with_backbone(precision="fp16", embedding="fp16", lm_head="fp16")) \
        == graphs + layers + sizes["backbone/head.onnx"]
    # quantized linears (layers, head) prepacked by ORT's CPU kernel; the int8 embedding table is gathered as is
    q = _with_backbone(precision="int4", embedding="int8", lm_head="int8", quantizer="hqq")
    head = sizes["backbone/head.onnx"]
    assert backbone_bytes(q) == round(graphs + (PREPACKED["int4"] - 1) * layers + (PREPACKED["int8"] - 1) * head)
    assert backbone_bytes(q, prepacked=False) == graphs


def test_facts_of_a_manifest():
    m = make_manifest()
    f = facts_of(m)
    sizes = {p: [m.files[e.variants[p].path].bytes for e in m.experts] for p in ("fp16", "int4")}
    assert f.file_bytes == {p: round(sum(v) / len(v)) for p, v in sizes.items()}
    assert f.resident_bytes == {"fp16": 2 * f.file_bytes["fp16"], "int4": f.file_bytes["int4"]}  # fp16 upcast
    assert (f.experts, f.top_k, f.moe_layers, f.max_context) == (4, 1, 2, 128)
    assert facts_of(m, {"fp16": 7, "int4": 3}).resident_bytes == {"fp16": 7, "int4": 3}


# --- the command line, on a real bundle ---------------------------------------------------------


def test_info_plan_prints_the_split(tiny_qwen3):
    proc = dymoe("info", tiny_qwen3.bundle, "--plan", "--memory", "16GB", "--context", "64")
    assert proc.returncode == 0, proc.stderr
    for needle in ("16GB = 14.90 GiB", "backbone (fp32, resident)", "KV cache (64 tokens", "runtime reserve",
                   "expert budget", "experts that fit", "uniform routing"):
        assert needle in proc.stdout, proc.stdout
    for precision in ("fp32", "int8", "int4", "int2"):
        assert f"│ {precision:>9} │" in proc.stdout


def test_info_plan_for_a_device_profile(tiny_qwen3):
    proc = dymoe("info", tiny_qwen3.bundle, "--plan", "--target", "orin-nx-16gb")
    assert proc.returncode == 0, proc.stderr
    assert "12.00 GiB usable on orin-nx-16gb" in proc.stdout and "read ms per token" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--plan", "--memory", "16"], "has no unit"),
    (["--plan", "--memory", "16G"], "unknown unit"),
    (["--plan"], "--plan needs the device's memory"),
    (["--memory", "16GB"], "describe a plan"),
    (["--plan", "--memory", "16GB", "--context", "100000"], "--context 100000"),
    (["--plan", "--target", "orin-nx-32gb"], "unknown device profile"),
])
def test_info_plan_errors_are_two_lines(tiny_qwen3, args, needle):
    assert_clean_error(dymoe("info", tiny_qwen3.bundle, *args), needle)
