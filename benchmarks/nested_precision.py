"""Nested precisions (after D2-MoE / SliceMoE): can a low-bit expert be the prefix of the higher
one, so that a promotion reads only the rest and the cache never holds two copies? Measured on
the shipped demo model's trained experts, every projection, block 32, against the bundle's own
independent HQQ int2 and int4:

* ``slice``: int2 = the two high bits of the int4 codes (scale 4s, zero z/4 - 3/8, a float zero
  point as MatMulNBits allows); int4 = int2 + the two low bits (scale s, zero 3/2). Exactly int4
  when promoted; the question is how much worse the int2 prefix is than HQQ's own int2.
* ``residual``: int2 = HQQ's own int2; int4 = int2 + an HQQ int2 of what it missed. The prefix is
  exactly int2; the question is how the 2+2 sum compares with int4.

For each: relative weight error ||W - W'|| / ||W|| and relative expert-output error on Gaussian
inputs (median over experts). And what the slice's float zero points cost ONNX Runtime on this
CPU: one 2-bit MatMulNBits (192 x 4096, block 32, accuracy level 4) with integer and with float
zero points, median time per decode call. Prints tables, writes results/nested_precision.json.

    python benchmarks/nested_precision.py [--block 32] [--inputs 64]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _common import RESULTS, machine, med, show
from safetensors.numpy import load_file

from dymoe.demo import demo_model_dir
from dymoe.toolchain.blockquant import QuantizedMatrix, dequantize
from dymoe.toolchain.expert_graph import reference_forward
from dymoe.toolchain.hqq import quantize_hqq


def slice_int2(q4: QuantizedMatrix) -> np.ndarray:
    """The int2 prefix of an int4 matrix, dequantized: codes q >> 2, scale 4s, zero z/4 - 3/8 (the
    dropped low bits average 3/2 steps, so the prefix is centred, not truncated)."""
    B = q4.block_size
    s = np.repeat(q4.scale, B, axis=0)[: q4.q.shape[0]]
    z = np.repeat(q4.zero_point.astype(np.float32), B, axis=0)[: q4.q.shape[0]]
    return 4 * s * ((q4.q >> 2).astype(np.float32) - (z / 4 - 0.375))


def matmulnbits_ms(float_zero: bool, K: int = 192, N: int = 4096, B: int = 32, calls: int = 300) -> float:
    """Median ms of one decode call of a 2-bit MatMulNBits with integer or float zero points."""
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dymoe.toolchain.blockquant import pack_codes

    rng = np.random.default_rng(0)
    nb = K // B
    codes = rng.integers(0, 4, (N, nb, B)).astype(np.uint8)
    zf = (rng.random((N, nb)) * 3).astype(np.float32)
    z = numpy_helper.from_array(zf if float_zero else pack_codes(np.rint(zf).astype(np.uint8), 2), "z")
    inits = [numpy_helper.from_array(pack_codes(codes, 2), "w"),
             numpy_helper.from_array((rng.random((N, nb)) * 0.01).astype(np.float32), "s"), z]
    node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=K, N=N, bits=2,
                            block_size=B, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", N])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, K)).astype(np.float32)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return med(times) * 1e3


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=64, help="Gaussian input rows per expert")
    args = ap.parse_args()
    weights = load_file(demo_model_dir() / "model.safetensors")
    prefix = {n.rsplit(".", 2)[0] for n in weights if ".experts." in n and n.endswith("gate_proj.weight")}
    rng = np.random.default_rng(0)
    errs: dict[str, list[float]] = {k: [] for k in ("int4", "int2", "slice int2", "residual 2+2",
                                                    "out int4", "out int2", "out slice int2", "out residual 2+2")}
    for p in sorted(prefix):
        torch_w = {m: weights[f"{p}.{m}_proj.weight"].astype(np.float32) for m in ("gate", "up", "down")}
        variants = {k: {} for k in ("int4", "int2", "slice int2", "residual 2+2")}
        for m, w in torch_w.items():
            kn = w.T
            q4 = quantize_hqq(kn, 4, args.block)
            q2 = quantize_hqq(kn, 2, args.block)
            w2 = dequantize(q2)
            r2 = dequantize(quantize_hqq(kn - w2, 2, args.block))
            for name, approx in (("int4", dequantize(q4)), ("int2", w2), ("slice int2", slice_int2(q4)),
                                 ("residual 2+2", w2 + r2)):
                variants[name][m] = approx.T
                errs[name].append(rel(approx, kn))
        x = rng.standard_normal((args.inputs, torch_w["gate"].shape[1])).astype(np.float32)
        y = reference_forward(x, torch_w["gate"], torch_w["up"], torch_w["down"])
        for name, v in variants.items():
            errs[f"out {name}"].append(rel(reference_forward(x, v["gate"], v["up"], v["down"]), y))
    forms = ("int2", "slice int2", "int4", "residual 2+2")
    rows = [[name, med(errs[name]), med(errs[f"out {name}"])] for name in forms]
    show(f"nested precisions on the demo's {len(prefix)} experts (median relative error, block {args.block})",
         ["form", "weight error", "output error"], rows)
    verdict = {
        "slice_int2_vs_int2_output_error": med(errs["out slice int2"]) / med(errs["out int2"]),
        "residual_vs_int4_output_error": med(errs["out residual 2+2"]) / med(errs["out int4"]),
    }
    print(f"slice int2 / independent int2 output error: {verdict['slice_int2_vs_int2_output_error']:.2f}x; "
          f"residual 2+2 / int4: {verdict['residual_vs_int4_output_error']:.2f}x")
    speed = {"integer_zero_ms": matmulnbits_ms(False), "float_zero_ms": matmulnbits_ms(True)}
    show("2-bit MatMulNBits, 192 x 4096, one decode call (median)", ["zero points", "ms"],
         [["integer", speed["integer_zero_ms"]], ["float (the slice needs them)", speed["float_zero_ms"]]])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "nested_precision.json"
    out.write_text(json.dumps({"machine": machine(), "block": args.block, "experts": len(prefix),
                               "median": {k: med(v) for k, v in errs.items()}, **verdict,
                               "matmulnbits_2bit": speed}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
