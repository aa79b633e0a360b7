"""Quantizers side by side: rtn, hqq and gptq.

1. Demo model (``models/demo``): exports it once per quantizer (fp32, int8, int4, int2; gptq
   collects the experts' inputs on ``models/demo/calibration.txt``, training text, never the
   held-out text), then scores held-out perplexity with every expert at one precision against
   fp32, the mean expert errors per precision, and the export time per quantizer.
2. Realistic shapes (hidden 2048, expert intermediate 5632, random weights, 1024 correlated routed
   tokens): seconds per expert and peak memory of each quantizer, each in a fresh process.

    python benchmarks/quantizers.py [--windows 40] [--experts 2] [--skip-demo] [--skip-synthetic]

Prints tables and writes results/quantizers.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, med, show, write_json

QUANTIZERS = ("rtn", "hqq", "gptq")
INTEGER = ("int8", "int4", "int2")


# --- 1. demo model -------------------------------------------------------------------------


def export_demo(quantizer: str, out: Path) -> float:
    from dymoe.demo import demo_model_dir
    from dymoe.pipelines import GptqOptions, export
    from dymoe.toolchain.options import ExportOptions

    src = demo_model_dir()
    gptq = GptqOptions((str(src / "calibration.txt"),)) if quantizer == "gptq" else None
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    export(str(src), out, ExportOptions(precisions=("fp32", *INTEGER), quantizer="hqq" if gptq else quantizer), gptq)
    return time.perf_counter() - t0


def heldout_ids(bundle: Path) -> list[int]:
    from dymoe.demo import demo_model_dir
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.tokenizer import TextTokenizer

    return TextTokenizer(Bundle(bundle).tokenizer_path()).encode((demo_model_dir() / "heldout.txt").read_text())


def score(bundle: Path, precision: str, ids: list[int], window: int, windows: int):
    from dymoe.runtime.evaluate import perplexity
    from dymoe.runtime.model_session import open_model

    session = open_model(bundle, precision=precision)
    return perplexity(session.model, ids, window, windows)


def heldout_inputs(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` calibrated on the held-out text with the experts' inputs collected: the
    tokens each expert is routed on text none of the quantizers saw."""
    from dymoe.calibration.options import CalibrationOptions
    from dymoe.calibration.run import commit, measure
    from dymoe.demo import demo_model_dir

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    options = CalibrationOptions(samples=64, seq_len=256, sensitivity=False, collect_inputs=True)
    commit(out, measure(out, [demo_model_dir() / "heldout.txt"], options))
    return out


def routed_errors(bundles: dict[str, Path], inputs_from: Path) -> dict[str, dict[str, float]]:
    """Mean ||y - y_q|| / ||y|| per quantizer and precision on every expert's routed held-out
    tokens, computed the same way for every bundle."""
    import onnx

    from dymoe.bundle.calibration import read_calibration
    from dymoe.bundle.inputs import load_expert_inputs
    from dymoe.bundle.manifest import read_manifest
    from dymoe.toolchain.expert_graph import reference_forward
    from dymoe.toolchain.expert_weights import expert_weights

    m = read_manifest(inputs_from)
    reader = load_expert_inputs(inputs_from, m, read_calibration(inputs_from, m))
    sums: dict[str, dict[str, list[float]]] = {q: {p: [] for p in INTEGER} for q in bundles}
    for entry in m.experts:
        x = reader.rows(entry.layer, entry.expert)
        if x.shape[0] == 0:
            continue
        ref = reference_forward(x, *expert_weights(onnx.load(inputs_from / entry.variants["fp32"].path)))
        for q, b in bundles.items():
            mb = read_manifest(b)
            for p in INTEGER:
                graph = onnx.load(b / mb.expert(entry.layer, entry.expert).variants[p].path)
                y = reference_forward(x, *expert_weights(graph))
                sums[q][p].append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
    return {q: {p: float(np.mean(v)) for p, v in d.items()} for q, d in sums.items()}


def demo(args) -> dict:
    from dymoe.bundle.manifest import read_manifest
    from dymoe.runtime.evaluate import top1_agreement

    root = CACHE / "quantizers"
    bundles, export_s = {}, {}
    for q in args.quantizers:
        bundles[q] = root / f"demo-{q}"
        export_s[q] = export_demo(q, bundles[q])
        print(f"exported demo with {q} in {export_s[q]:.1f} s", flush=True)
    first = bundles[args.quantizers[0]]
    ids = heldout_ids(first)
    ref = score(first, "fp32", ids, args.window, args.windows)
    ppl = {"fp32": math.exp(ref.nll)}
    rows, results = [["fp32", "-", f"{ppl['fp32']:.2f}", "-", "-"]], {"fp32": {"ppl": ppl["fp32"]}}
    for q in args.quantizers:
        results[q] = {}
        for p in INTEGER:
            run = score(bundles[q], p, ids, args.window, args.windows)
            value = math.exp(run.nll)
            results[q][p] = {"ppl": value, "delta_pct": 100 * (value / ppl["fp32"] - 1),
                             "top1_agreement": top1_agreement(run, ref)}
            rows.append([q, p, f"{value:.2f}", f"{results[q][p]['delta_pct']:+.2f} %",
                         f"{results[q][p]['top1_agreement']:.3f}"])
    show(f"held-out perplexity, every expert at one precision ({ref.tokens} tokens, {ref.windows} windows "
         f"of {args.window})", ["quantizer", "precision", "perplexity", "vs fp32", "top-1 agree"], rows)

    routed = routed_errors(bundles, heldout_inputs(first, root / "heldout-inputs"))
    err_rows, errors = [], {}
    for q in args.quantizers:
        m = read_manifest(bundles[q])
        errors[q] = {}
        for p in INTEGER:
            vs = [e.variants[p] for e in m.experts]
            errors[q][p] = {"weight": float(np.mean([v.weight_rel_error for v in vs])),
                            "probe_output": float(np.mean([v.output_rel_error for v in vs])),
                            "routed_output": routed.get(q, {}).get(p),
                            "fell_back": sum(v.quantizer_note is not None for v in vs)}
            e = errors[q][p]
            err_rows.append([q, p, f"{e['weight']:.4f}", f"{e['probe_output']:.4f}",
                             "-" if e["routed_output"] is None else f"{e['routed_output']:.4f}", str(e["fell_back"])])
    show("mean expert error (relative): weights, output on a Gaussian probe, output on the tokens routed to the "
         "expert in held-out text",
         ["quantizer", "precision", "weight", "probe output", "routed output", "fell back"], err_rows)
    show("export time (fp32,int8,int4,int2; gptq includes collecting the inputs)", ["quantizer", "seconds"],
         [[q, f"{export_s[q]:.1f}"] for q in args.quantizers])
    return {"perplexity": results, "errors": errors, "export_s": export_s,
            "heldout_tokens": ref.tokens, "window": args.window, "windows": ref.windows}


# --- 2. realistic shapes -------------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
import numpy as np
from dymoe.toolchain.quantizers import QuantizerOptions, RoutedInputs, quantize_expert
q, H, I, T, experts = sys.argv[1], *map(int, sys.argv[2:6])
rng = np.random.default_rng(0)
mix = rng.standard_normal((64, H)).astype(np.float32) / 8
out = {"seconds": {p: [] for p in ("int8", "int4", "int2")}}
for e in range(experts):
    gate, up = (rng.standard_normal((I, H)).astype(np.float32) / np.sqrt(H) for _ in range(2))
    down = rng.standard_normal((H, I)).astype(np.float32) / np.sqrt(I)
    x = rng.standard_normal((T, 64)).astype(np.float32) @ mix + 0.1 * rng.standard_normal((T, H)).astype(np.float32)
    if e == 0:
        out["baseline_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inputs = RoutedInputs(x) if q == "gptq" else None  # shared by the three precisions, as in an export
    memo = {}  # likewise
    for p in ("int8", "int4", "int2"):
        t0 = time.perf_counter()
        quantize_expert(gate, up, down, p, 32, QuantizerOptions(q), inputs=inputs, memo=memo)
        out["seconds"][p].append(time.perf_counter() - t0)
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def synthetic(args) -> dict:
    H, I, T = 2048, 5632, 1024
    weights_mib = 3 * H * I * 4 / 2**20
    rows, results = [], {}
    for q in args.quantizers:
        r = subprocess.run([sys.executable, "-c", CHILD, q, str(H), str(I), str(T), str(args.experts)],
                           capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results[q] = res
        secs = {p: med(v) for p, v in res["seconds"].items()}
        rows.append([q, *[f"{secs[p]:.2f}" for p in INTEGER], f"{sum(secs.values()):.2f}",
                     f"{res['peak_mib']:.0f}", f"{res['peak_mib'] - res['baseline_mib']:.0f}"])
        print(f"{q}: {rows[-1]}", flush=True)
    show(f"seconds per expert (H {H}, I {I}, fp32 weights {weights_mib:.0f} MiB, {T} routed tokens; median of "
         f"{args.experts}) and peak RSS", ["quantizer", *INTEGER, "all three", "peak RSS MiB", "above baseline MiB"],
         rows)
    return {"hidden": H, "intermediate": I, "tokens": T, "experts": args.experts, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantizers", default=",".join(QUANTIZERS))
    ap.add_argument("--window", type=int, default=256, help="tokens per perplexity window (the demo's context)")
    ap.add_argument("--windows", type=int, default=None, help="held-out windows scored (default: all)")
    ap.add_argument("--experts", type=int, default=2, help="realistic-shape experts per quantizer")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args()
    args.quantizers = tuple(q for q in args.quantizers.split(",") if q)
    data = {}
    if not args.skip_demo:
        data["demo"] = demo(args)
    if not args.skip_synthetic:
        data["synthetic"] = synthetic(args)
    write_json("quantizers", data)


if __name__ == "__main__":
    main()
