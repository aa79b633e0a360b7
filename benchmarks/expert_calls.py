"""Would fewer, larger ORT calls make decode faster? A layer's 8 routed experts as 8 sessions (what
dymoe runs: one call per expert) against the same 8 experts fused into one graph (one call per layer,
their outputs weighted and summed inside it), at Qwen3-30B-A3B's expert shape (hidden 2048,
intermediate 768, int4 MatMulNBits of block 32).

Each arrangement gets ``--layers`` layers' worth of sessions, every one holding its own prepacked copy
of the weights, and a decode step runs them layer after layer: 48 layers of 8 int4 experts are about
0.9 GB, more than this machine's last-level cache, so the weights come from memory as in a real
decode step (a single layer of 8 experts would sit in cache and flatter both).

    python benchmarks/expert_calls.py [--layers 48] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from _common import med, show, write_json
from onnx import TensorProto, helper

from dymoe.runtime.experts import LayerStep, combine
from dymoe.runtime.options import EXPERT_THREADS
from dymoe.runtime.ort_session import create_session
from dymoe.toolchain.expert_graph import build_expert_model

H, I, TOP_K = 2048, 768, 8  # Qwen3-30B-A3B: hidden, expert intermediate, experts per token


def experts(seed: int = 0) -> list[onnx.ModelProto]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(TOP_K):
        gate, up = (rng.standard_normal((I, H), dtype=np.float32) * 0.02 for _ in range(2))
        down = rng.standard_normal((H, I), dtype=np.float32) * 0.02
        out.append(build_expert_model(gate, up, down, "int4", 32)[0])
    return out


def fused(models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One graph: x [1, H] and w [TOP_K] in, sum_e w[e] * expert_e(x) out."""
    nodes, inits, terms = [], [], []
    for e, m in enumerate(models):
        def name(n: str, e=e) -> str:
            return n if n == "x" else f"e{e}_{n}"
        for t in m.graph.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = name(t.name)
            inits.append(c)
        for n in m.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = name(n.name)
            del c.input[:], c.output[:]
            c.input.extend(name(i) for i in n.input)
            c.output.extend(name(o) for o in n.output)
            nodes.append(c)
        nodes += [helper.make_node("Slice", ["w", f"s{e}", f"s{e + 1}"], [f"w{e}"]),
                  helper.make_node("Mul", [name("y"), f"w{e}"], [f"t{e}"])]
        inits += [helper.make_tensor(f"s{e}", TensorProto.INT64, [1], [e])]
        terms.append(f"t{e}")
    inits.append(helper.make_tensor(f"s{TOP_K}", TensorProto.INT64, [1], [TOP_K]))
    nodes.append(helper.make_node("Sum", terms, ["y"]))
    graph = helper.make_graph(nodes, "fused_experts",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [TOP_K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    out = helper.make_model(graph, opset_imports=models[0].opset_import)
    out.ir_version = models[0].ir_version
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    models = experts()
    blobs = [m.SerializeToString() for m in models]
    fused_blob = fused(models).SerializeToString()
    x = np.random.default_rng(1).standard_normal((1, H), dtype=np.float32)
    w = np.full(TOP_K, 1.0 / TOP_K, dtype=np.float32)
    print(f"creating {args.layers} x {TOP_K} expert sessions and {args.layers} fused ones ...", flush=True)
    separate = [[create_session(b, 1, "expert") for b in blobs] for _ in range(args.layers)]
    one = [create_session(fused_blob, 1, "fused") for _ in range(args.layers)]
    one2 = [create_session(fused_blob, 2, "fused") for _ in range(args.layers)]
    pool = ThreadPoolExecutor(EXPERT_THREADS - 1)

    # the same sum, so the arrangements are compared on equal work (and checked to agree)
    def step_separate() -> np.ndarray:
        for layer in separate:
            y = sum(wi * s.run(None, {"x": x})[0] for wi, s in zip(w, layer, strict=True))
        return y

    # dymoe's own code path: runtime/experts.combine dealing a layer's experts over EXPERT_THREADS
    step = LayerStep(0, "decode", x, np.arange(TOP_K)[None, :], w[None, :], np.zeros(1, np.float32), x)

    def step_dymoe() -> np.ndarray:
        for layer in separate:
            y = combine(step, lambda e, xe, layer=layer: layer[e].run(None, {"x": xe})[0], pool=pool,
                        threads=EXPERT_THREADS)
        return y

    def step_fused(sessions) -> np.ndarray:
        for s in sessions:
            y = s.run(None, {"x": x, "w": w})[0]
        return y

    arrangements = {"8 calls per layer, 1 thread": step_separate,
                    "8 calls per layer, 2 threads (dymoe)": step_dymoe,
                    "1 fused call per layer, 1 thread": lambda: step_fused(one),
                    "1 fused call per layer, 2 intra-op threads": lambda: step_fused(one2)}
    ref = step_separate()
    for name, f in arrangements.items():
        np.testing.assert_allclose(f(), ref, rtol=1e-4, atol=1e-6, err_msg=name)
    times: dict[str, list[float]] = {k: [] for k in arrangements}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every arrangement alike
        for name, f in arrangements.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    base = med(times["8 calls per layer, 1 thread"])
    weight_bytes = sum(len(b) for b in blobs) * args.layers
    rows = [[k, med(v) * 1e3, med(v) * 1e3 / args.layers, weight_bytes / med(v) / 1e9, base / med(v)]
            for k, v in times.items()]
    show(f"{TOP_K} int4 experts per layer x {args.layers} layers (H {H}, I {I}; median of {args.repeats})",
         ["arrangement", "ms per step", "ms per layer", "GB/s of weights", "speed-up"], rows)
    write_json("expert_calls", {"layers": args.layers, "weight_bytes": weight_bytes,
                                "ms_per_step": {k: med(v) * 1e3 for k, v in times.items()},
                                "runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})


if __name__ == "__main__":
    main()
