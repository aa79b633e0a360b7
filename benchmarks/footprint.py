"""Peak RSS against base + budget, every policy, each in a child process of its own (the kernel's
peak, VmHWM, from the moment the model is open), on the widened demo bundle that
`benchmarks/runtime_policies.py` builds. `tests/test_memory.py` asserts the same bound on a
smaller widening; this prints it at the benchmark's sizes.

    python benchmarks/footprint.py [--budgets 10%,25%] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

from _common import show, write_json
from runtime_policies import POLICIES, bundle_for

CHILD = textwrap.dedent("""
    import json, sys
    from dymoe.runtime.memory import peak_rss, reset_peak
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import PolicyRun

    s = open_model(sys.argv[1], policy=PolicyRun(sys.argv[2], sys.argv[3], io="direct"))
    reset_peak()
    r = s.generate_ids(list(range(100, 132)), max_new_tokens=int(sys.argv[4]))
    m = s.metrics(r)
    print(json.dumps({"peak": peak_rss(), "base": m["memory_base_bytes"], "budget": m["budget_bytes"],
                      "peak_resident": m["peak_resident_bytes"], "tpot_s": r.tpot_s}))
""")
MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="10%,25%")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    bundle, _ = bundle_for("widened")
    rows, out = [], []
    for budget in args.budgets.split(","):
        for policy in args.policies.split(","):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), policy, budget, str(args.tokens)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode:
                raise SystemExit(proc.stderr)
            m = json.loads(proc.stdout)
            over = m["peak"] - m["base"] - m["budget"]
            out.append({"policy": policy, "budget": budget, **m, "over_bytes": over})
            rows.append([budget, policy, m["base"] / MiB, m["budget"] / MiB, m["peak_resident"] / MiB,
                         m["peak"] / MiB, over / MiB])
    show(f"peak RSS against base + budget ({bundle.name}, {args.tokens} tokens after a 32-token prompt, "
         "--io direct, a fresh process each)",
         ["budget", "policy", "base MiB", "budget MiB", "peak resident experts MiB", "peak RSS MiB",
          "over base + budget MiB"], rows)
    write_json("footprint", {"bundle": str(bundle), "runs": out})


if __name__ == "__main__":
    main()
