"""The budget is the process's real footprint: a run's peak RSS (the kernel's count, in a child
process of its own) stays within base + budget + a documented slack, for every policy; and the
pure rules that keep it there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dymoe.runtime.memory import FOOTPRINT_SLACK_BYTES, learned_reserve, should_trim
from dymoe.toolchain.export import export
from dymoe.toolchain.options import ExportOptions
from dymoe.toolchain.widen import widen_checkpoint

MiB = 2**20


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    """The demo model widened 8x: 112 experts of 0.6 MB (fp16), enough churn to fragment a heap."""
    from dymoe.demo import demo_model_dir

    root = tmp_path_factory.mktemp("widened")
    widen_checkpoint(demo_model_dir(), root / "src", 8, 0)
    export(str(root / "src"), root / "b", ExportOptions(precisions=("fp16", "int4", "int2"), quantizer="rtn"))
    return root / "b"


CHILD = textwrap.dedent("""
    import json, sys
    from dymoe.runtime.memory import peak_rss, reset_peak
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import PolicyRun

    s = open_model(sys.argv[1], policy=PolicyRun(sys.argv[2], sys.argv[3]))
    reset_peak()  # from here on: the generation's peak
    r = s.generate_ids(list(range(100, 132)), max_new_tokens=24)
    m = s.metrics(r)
    print(json.dumps({"peak": peak_rss(), "base": m["memory_base_bytes"], "budget": m["budget_bytes"],
                      "loads": m["loads"], "peak_resident": m["peak_resident_bytes"]}))
""")


@pytest.mark.parametrize("budget", ["10%", "25%"])
@pytest.mark.parametrize("policy", ["ondemand", "lru", "lru-prefetch", "static-int4", "static-int2", "dymoe"])
def test_peak_rss_stays_within_base_plus_budget(widened, policy, budget):
    out = subprocess.run([sys.executable, "-c", CHILD, str(widened), policy, budget], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["loads"] > 0 and m["peak_resident"] <= m["budget"]
    over = m["peak"] - m["base"] - m["budget"]
    assert over <= FOOTPRINT_SLACK_BYTES, (
        f"{policy} at {budget}: peak RSS {m['peak'] / MiB:.1f} MiB is {over / MiB:.1f} MiB over base "
        f"{m['base'] / MiB:.1f} + budget {m['budget'] / MiB:.1f} MiB")


@pytest.mark.parametrize("rss, need, limit, trim", [
    (100, 10, 120, False),
    (100, 20, 120, False),  # exactly at the limit: fits
    (100, 21, 120, True),
    (130, 0, 120, True),  # already over (free heap piled up): trim even for nothing new
])
def test_should_trim(rss, need, limit, trim):
    assert should_trim(rss, need, limit) is trim


@pytest.mark.parametrize("reserve, peak, limit, cap, want", [
    (0, 90, 100, 50, 0),  # under the limit, nothing to learn
    (0, 130, 100, 50, 30),  # 30 over: hold 30 back from now on
    (30, 145, 100, 50, 50),  # never more than the cap
    (40, 100, 100, 50, 40),  # exactly at the limit: keep what was learned
    (40, 80, 100, 50, 35),  # 20 of room gives a quarter back
    (3, 0, 100, 50, 0),  # never below zero
])
def test_learned_reserve(reserve, peak, limit, cap, want):
    assert learned_reserve(reserve, peak, limit, cap) == want
