"""The standard comparison (`make bench`): every policy side by side with dymoe bench's
machinery, at budgets of 10, 15, 25 and 50 % of the fp16 experts' resident cost, --io direct and
an emulated Jetson Orin Nano NVMe, cold and warm cache, on one of:

* ``widened`` (the default): the shipped demo model widened ``--factor`` times
  (``dymoe.toolchain.widen``: every expert neuron copied, the function unchanged), so experts
  have realistic sizes (k=64: 4.7 MB fp16 each, 112 of them) AND trained routing and accuracy;
* ``demo``: the shipped demo model as it is (experts of a few KB: offloading measures Python);
* ``synthetic``: random weights of realistic shapes (hidden 2048, expert intermediate 1024,
  64 experts, top-8, 4 layers): no trained routing, no accuracy.

The widened bundle is calibrated once on the demo's calibration text (not the held-out text the
accuracy is measured on), as a user would before running dymoe. Beside each policy the table gives
its floor: max(compute, bytes read per token / measured direct-read bandwidth), where compute is
the decode time per token with every expert resident at the policy's top precision and nothing
read (measured here, warm), and the bandwidth is measured on the bundle's own expert files.

Writes JSON and plots under results/ (not committed); the models are built once into .cache/.

    python benchmarks/runtime_policies.py [--model widened --factor 64] [--budgets 10%,15%,25%,50%]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import CACHE, RESULTS, machine, show
from rich.console import Console

from dymoe.console import reporter
from dymoe.runtime.bench import BenchOptions, run_bench
from dymoe.runtime.bench_plots import write_plots
from dymoe.runtime.policy_config import PolicyRun
from dymoe.tables import print_tables
from dymoe.toolchain.export import export
from dymoe.toolchain.options import BACKBONE_PRECISION, ExportOptions
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

POLICIES = "ondemand,lru,lru-prefetch,static-int4,static-int2,dymoe"


def bundle_for(model: str, factor: int = 64, seed: int = 0) -> tuple[Path, Path | None]:
    """(bundle, held-out text or None); built and exported once into .cache/."""
    from dymoe.demo import demo_model_dir, ensure_demo_bundle

    if model == "demo":
        return ensure_demo_bundle(), demo_model_dir() / "heldout.txt"
    if model == "widened":
        from dymoe.toolchain.widen import widen_checkpoint

        src = CACHE / f"demo_widened_k{factor}_s{seed}"
        if not (src / "config.json").exists():
            widen_checkpoint(demo_model_dir(), src, factor, seed)
        # keyed on the default backbone precision too: a bundle of another one is another model
        out = CACHE / f"bundle_demo_widened_k{factor}_s{seed}_bb{BACKBONE_PRECISION}"
        if not (out / "manifest.json").exists():
            with reporter(Console(stderr=True)) as progress:
                export(str(src), out, ExportOptions(precisions=("fp16", "int8", "int4", "int2"), workers=2,
                                                    progress=progress))
        ensure_calibrated(out, demo_model_dir() / "calibration.txt")
        return out, demo_model_dir() / "heldout.txt"
    src = CACHE / "synthetic_h2048_i1024_e64_k8_l4"
    if not (src / "config.json").exists():
        write_synthetic_checkpoint(src, hidden=2048, intermediate=1024, experts=64, top_k=8, layers=4,
                                   heads=16, kv_heads=4, vocab=8192)
    out = CACHE / "bundle_synthetic_policies"
    if not (out / "manifest.json").exists():
        export(str(src), out, ExportOptions(precisions=("fp16", "int8", "int4", "int2"), workers=2))
    return out, None


def ensure_calibrated(bundle: Path, text: Path) -> None:
    from dymoe.bundle.manifest import read_manifest
    from dymoe.calibration.options import CalibrationOptions
    from dymoe.calibration.run import calibrate

    if read_manifest(bundle).calibration:
        return
    with reporter(Console(stderr=True)) as progress:
        calibrate(bundle, [text], CalibrationOptions(), progress)


def floors(bundle: Path, result: dict, repeats: int = 3) -> dict:
    """Per budget and policy: the floor of its warm TPOT and how far above it the policy is."""
    from load_throughput import direct_read_bandwidth

    from dymoe.bundle.precisions import SKIP
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import resolve

    bw = direct_read_bandwidth(bundle)
    compute: dict[str, float] = {}
    out = {"direct_read_bytes_per_s": bw, "compute_s": compute, "budgets": {}}
    for entry in result["results"]:
        rows = {}
        for name, r in entry["warm"].items():
            top = next(p for p in resolve(name, result["precisions"], top="fp16").ladder if p != SKIP)
            if top not in compute:
                s = open_model(bundle, precision=top)
                try:
                    s.generate_ids(list(range(100, 132)), max_new_tokens=4)  # warm-up
                    compute[top] = sorted(s.generate_ids(list(range(100, 132)), max_new_tokens=24).tpot_s
                                          for _ in range(repeats))[repeats // 2]
                finally:
                    s.close()
            floor = max(compute[top], r["bytes_read_per_token"] / bw)
            rows[name] = {"top_precision": top, "floor_s": floor, "tpot_over_floor": r["tpot_s"] / floor}
        out["budgets"][entry["budget"]] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("widened", "demo", "synthetic"), default="widened")
    ap.add_argument("--factor", type=int, default=64, help="widening factor of --model widened")
    ap.add_argument("--seed", type=int, default=0, help="widening seed of --model widened")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--budgets", default="10%,15%,25%,50%")
    ap.add_argument("--io", default="direct")
    ap.add_argument("--storage-profile", default="orin-nano-nvme")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()

    bundle, heldout = bundle_for(args.model, args.factor, args.seed)
    opts = BenchOptions(
        policies=args.policies.split(","), budgets=args.budgets.split(","),
        base=PolicyRun("lru", io=args.io, storage_profile=args.storage_profile, full_precision="fp16"),
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
        accuracy=heldout is not None, data=heldout, window=128, windows=args.windows)
    with reporter(Console(stderr=True)) as progress:
        result = run_bench(bundle, opts, progress)
    print_tables(result, Console(width=220))
    from dymoe.runtime.bundle import Bundle

    result["precisions"] = Bundle(bundle).precisions
    result["floor"] = floors(bundle, result)
    fl = result["floor"]
    show(f"warm TPOT against its floor (direct read {fl['direct_read_bytes_per_s'] / 1e6:,.0f} MB/s; compute "
         + ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in fl["compute_s"].items()) + ")",
         ["budget", "policy", "floor ms", "TPOT / floor"],
         [[b, p, r["floor_s"] * 1e3, r["tpot_over_floor"]] for b, rows in fl["budgets"].items()
          for p, r in rows.items()])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_{args.model}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
    plots = write_plots(result, RESULTS / f"bench_{args.model}")
    print(f"wrote {path} and {len(plots)} plots in {RESULTS / f'bench_{args.model}'}")


if __name__ == "__main__":
    main()
