"""TensorRT's INT4 form against dymoe's portable int4, on the demo model's held-out text.

TensorRT's INT4 is symmetric (no zero point), signed, in blocks of 64 or 128, with fp16 scales and
fp16 arithmetic; dymoe's portable int4 is asymmetric UINT4 in blocks of 32 with float32 scales.
Every expert at one form, held-out perplexity over all of models/demo/heldout.txt in windows of
256 (the README's protocol), on the CPU provider:

* fp32 (reference) and the portable int4 (asymmetric, block 32) with rtn and hqq;
* what ``dymoe export --target tensorrt`` writes for the demo: its hidden size 192 and expert
  intermediate size 64 are not multiples of 128, so every projection takes blocks of 64;
* symmetric blocks of 128 as asked for, with a short last block where K is not a multiple of 128
  (gate/up: 128 + 64 of K = 192; down: one block of K = 64): ONNX and ORT run it, TensorRT would
  not (``dymoe check`` says so), so it is measured for the comparison only.

Both the default CPU kernels (ORT's MatMulNBits, int8 activations at accuracy level 4, as the
README's quantizer table) and exact arithmetic (``EXACT_INT_MATH``: x @ dequantize(W)) are scored.

    python benchmarks/trt_int4.py [--windows N] [--no-exact]

Prints a table and writes results/trt_int4.json.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from _common import CACHE, show, write_json

WINDOW = 256


def export_demo(out: Path, quantizer: str, target: str, precisions: tuple[str, ...]) -> Path:
    from dymoe.demo import demo_model_dir
    from dymoe.toolchain.export import ExportOptions, export

    shutil.rmtree(out, ignore_errors=True)
    export(str(demo_model_dir()), out, ExportOptions(precisions=precisions, quantizer=quantizer, target=target))
    return out


def symmetric_bundle(src: Path, out: Path, block: int, how: str) -> Path:
    """A copy of ``src`` (with fp32 experts) whose int4 variants are the symmetric fp16 form in blocks
    of ``block`` along every projection, short last blocks allowed (beyond what TensorRT takes)."""
    import onnx

    from dymoe.bundle.manifest import FileEntry, read_manifest
    from dymoe.toolchain.expert_weights import expert_weights
    from dymoe.toolchain.symmetric import quantize_sym_int4
    from dymoe.toolchain.trt_graph import build_fp16_model
    from dymoe.toolchain.variants import write_model

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    m = read_manifest(out)
    for entry in m.experts:
        gate, up, down = expert_weights(onnx.load(out / entry.variants["fp32"].path))
        mats = {p: quantize_sym_int4(np.ascontiguousarray(w.T), block, how)
                for p, w in (("gate", gate), ("up", up), ("down", down))}
        model, stats = build_fp16_model(gate, up, down, "int4", quantized=mats)
        v = entry.variants["int4"]
        (out / v.path).unlink()
        done = write_model(out, v.path, model)
        m.files[v.path] = FileEntry(done["bytes"], done["sha256"])
        v.weight_rel_error, v.output_rel_error, v.quantizer = stats.weight_rel_error, stats.output_rel_error, how
    m.quantization.formats["int4"] = "qdq_sym_int4_fp16"
    m.write(out)
    return out


def perplexity(bundle: Path, precision: str, ids: list[int], windows: int | None, exact: bool):
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.evaluate import perplexity as ppl
    from dymoe.runtime.experts import StaticExperts
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.ort_session import EXACT_INT_MATH

    experts = StaticExperts(Bundle(bundle), precision, session_config=EXACT_INT_MATH) if exact else None
    s = open_model(bundle, precision=precision, experts=experts)
    try:
        t = time.perf_counter()
        r = ppl(s.model, ids, WINDOW, windows)
        return r, time.perf_counter() - t
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=None, help="score at most this many windows (default: all)")
    ap.add_argument("--no-exact", action="store_true", help="only the default (fast) CPU kernels")
    args = ap.parse_args()

    from dymoe.bundle.manifest import read_manifest
    from dymoe.demo import demo_model_dir
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.check import check_bundle
    from dymoe.runtime.tokenizer import TextTokenizer
    from dymoe.targets.devices import load_device

    root = CACHE / "trt_int4"
    bundles: dict[tuple[str, str], tuple[Path, str]] = {}  # (form, quantizer) -> (bundle, precision)
    for how in ("rtn", "hqq"):
        portable = export_demo(root / f"portable-{how}", how, "ort", ("fp32", "int4"))
        trt = export_demo(root / f"tensorrt-{how}", how, "tensorrt", ("fp32", "int4"))
        blocks = "/".join(str(b) for c in check_bundle(trt) if c.precision == "int4" for b in c.blocks)
        if how == "rtn":
            bundles[("fp32 (reference)", "-")] = (portable, "fp32")
        bundles[("portable int4: asymmetric, block 32", how)] = (portable, "int4")
        bundles[(f"--target tensorrt int4: symmetric, block {blocks}", how)] = (trt, "int4")
        bundles[("symmetric, block 128 (short last blocks)", how)] = (
            symmetric_bundle(portable, root / f"sym128-{how}", 128, how), "int4")

    ids = TextTokenizer(Bundle(root / "portable-rtn").tokenizer_path()).encode(
        (demo_model_dir() / "heldout.txt").read_text())
    modes = [False] if args.no_exact else [False, True]
    rows, out, ref = [], [], {}
    orin = load_device("orin-nano-8gb")
    for (label, how), (bundle, precision) in bundles.items():
        m = read_manifest(bundle)
        check = {c.precision: c for c in check_bundle(bundle, orin)}[precision]
        vs = [e.variants[precision] for e in m.experts]
        row = {"form": label, "quantizer": how, "format": m.quantization.formats[precision],
               "tensorrt": check.verdicts["tensorrt"].ok,
               "weight_rel_error": float(np.mean([v.weight_rel_error for v in vs])),
               "expert_bytes": sum(m.files[v.path].bytes for v in vs)}
        for exact in modes:
            if exact and precision == "fp32":
                r, secs = ref[False]
            else:
                r, secs = perplexity(bundle, precision, ids, args.windows, exact)
            if precision == "fp32":
                ref[exact] = (r, secs)
            key = "exact" if exact else "default"
            row[f"ppl_{key}"] = r.ppl
            row[f"ppl_{key}_vs_fp32_pct"] = 100 * (r.ppl / ref[exact][0].ppl - 1)
            row[f"seconds_{key}"] = secs
            row["tokens"] = r.tokens
        out.append(row)
        rows.append([label, how, "yes" if row["tensorrt"] else "no", f"{row['weight_rel_error']:.4f}",
                     f"{row['expert_bytes'] / 2**20:.2f}",
                     *[f"{row['ppl_' + k]:.3f} ({row['ppl_' + k + '_vs_fp32_pct']:+.2f} %)"
                       for k in (["default"] if args.no_exact else ["default", "exact"])]])
    cols = ["every expert at", "quantizer", "TensorRT", "weight err", "MiB", "ppl, default CPU kernels"]
    if not args.no_exact:
        cols.append("ppl, exact arithmetic")
    show(f"demo model, held-out perplexity over {out[0]['tokens']:,} tokens (windows of {WINDOW})", cols, rows)
    write_json("trt_int4", {"window": WINDOW, "windows": args.windows, "rows": out})


if __name__ == "__main__":
    main()
