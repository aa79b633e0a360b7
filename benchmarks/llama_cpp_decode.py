"""All-resident decode against llama.cpp, on the same model and machine, measured rather than estimated.

The model is the synthetic checkpoint with Qwen3-30B-A3B's exact shapes (hidden 2048, 128 experts of
768, top-8, 32+4 heads of 128, vocabulary 151,936; ``export_qwen3_30b_shape.py``) at two depths, so a
per-layer cost and a fixed cost (embedding, LM head) come out of each engine and extrapolate to the
48-layer model without guessing which part of a step grows with depth.

- llama.cpp: the source that the llama-cpp-python sdist on PyPI vendors (version pinned below; this
  machine reaches PyPI but not GitHub), built with cmake for this CPU (``GGML_NATIVE``): only
  ``llama-bench`` and ``llama-quantize``. The checkpoint goes through llama.cpp's own
  ``convert_hf_to_gguf.py`` to f16 GGUF (vocabulary-less: the synthetic word-level tokenizer is not one
  llama.cpp knows, and llama-bench feeds random token ids anyway), then ``llama-quantize Q4_0`` with its
  default choices (what a user gets: it keeps ``output.weight`` at Q6_K). ``llama-bench -n TOKENS -p 0``:
  tokens per second of generation.
- dymoe: the same checkpoint exported with hqq int4 experts (block 32) and the default int8 backbone
  (``--backbone`` adds other backbone precisions), every expert resident, timed per part by
  ``decode_profile.py`` (TOKENS after a PROMPT-token prompt).

Both engines are extrapolated the same way: a straight line through ms per token at each depth. dymoe
is also extrapolated from its parts at the deepest depth (layer graphs, experts and Python scaled by
depth; embedding and LM head once), a cross-check that does not depend on two noisy totals.

Nothing here runs in the tests or CI (it downloads and compiles llama.cpp: about 15 minutes on 2 cores
the first time; kept in .cache/bench/llama.cpp).

    python benchmarks/llama_cpp_decode.py [--layers 4,8] [--threads 2] [--tokens 32] [--prompt 32]
        [--rounds 5] [--repeats 3] [--backbone int8,int4] [--llama-cpp SOURCE_TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from _common import CACHE, med, show, write_json
from decode_profile import extrapolate, profile
from export_qwen3_30b_shape import FULL_LAYERS, checkpoint

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built

# Run by a child Python: llama.cpp's converter, with the vocabulary replaced by "none" plus its size.
_CONVERT = """
import runpy, sys
from pathlib import Path
src = Path(sys.argv[1])
sys.path[:0] = [str(src), str(src / "gguf-py")]
from conversion.qwen import Qwen3MoeModel
def set_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
Qwen3MoeModel.set_vocab = set_vocab
sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_cpp_source() -> Path:
    """The llama.cpp tree vendored by the pinned llama-cpp-python sdist (downloaded once)."""
    root = CACHE / "llama.cpp"
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
             "--no-binary", ":all:", "-d", root])
    with tarfile.open(sdist) as tf:
        tf.extractall(root, filter="data")
    return src


def build(src: Path) -> Path:
    """``llama-bench`` and ``llama-quantize`` for this CPU; returns the folder holding them."""
    bindir = src / "build" / "bin"
    if (bindir / "llama-bench").exists() and (bindir / "llama-quantize").exists():
        return bindir
    run(["cmake", "-S", src, "-B", src / "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", src / "build", "-j", str(os.cpu_count() or 1), "--target", "llama-bench",
         "llama-quantize"])
    return bindir


def gguf_q4_0(src: Path, bindir: Path, ckpt: Path) -> Path:
    out = CACHE / f"{ckpt.name}-Q4_0.gguf"
    if out.exists():
        return out
    f16 = CACHE / f"{ckpt.name}-f16.gguf"
    if not f16.exists():
        tmp = f16.with_suffix(".partial")
        run([sys.executable, "-c", _CONVERT, src, ckpt, "--outtype", "f16", "--outfile", tmp])
        tmp.rename(f16)
    tmp = out.with_suffix(".partial")
    run([bindir / "llama-quantize", f16, tmp, "Q4_0", str(os.cpu_count() or 1)], stdout=subprocess.DEVNULL)
    tmp.rename(out)
    f16.unlink()  # 3-5 GB: only the Q4_0 file is timed
    return out


def llama_bench(bindir: Path, gguf: Path, threads: int, tokens: int, repeats: int) -> dict:
    """llama-bench's generation test: ms per token (its mean over ``repeats``) and the spread. From an
    empty context: its ``-d`` (context depth) crashes on a vocabulary-less model, and attention over
    the 32 tokens dymoe's step sees is a few hundredths of a millisecond per layer."""
    r = run([bindir / "llama-bench", "-m", gguf, "-p", "0", "-n", str(tokens), "-t",
             str(threads), "-r", str(repeats), "-o", "json"], capture_output=True, text=True)
    test = json.loads(r.stdout)[0]
    return {"ms_per_token": 1e3 / test["avg_ts"], "tokens_per_s": test["avg_ts"], "stddev_ts": test["stddev_ts"],
            "model_bytes": test["model_size"], "type": test["model_type"], "build": test["build_commit"]}


def dymoe_bundle(ckpt: Path, backbone: str) -> Path:
    out = CACHE / f"bundle_{ckpt.name}_int4_bb{backbone}"
    if not (out / "manifest.json").exists():
        run([sys.executable, "-m", "dymoe.cli", "export", ckpt, "--out", out, "--precisions", "int4",
             "--backbone-precision", backbone, "--workers", str(min(2, os.cpu_count() or 1)), "--force"])
    return out


def fit(depths: list[int], ms: list[float]) -> tuple[float, float]:
    """Least-squares per-layer and fixed cost from ms per token at each depth."""
    slope, intercept = np.polyfit(np.asarray(depths, float), np.asarray(ms, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,8", help="depths to measure (comma list, at least two; from 4 layers "
                    "up the weights no longer fit this machine's 480 MiB last-level cache)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="llama-bench runs per depth, alternating depths; "
                    "dymoe's medians are over as many steps")
    ap.add_argument("--repeats", type=int, default=3, help="llama-bench -r: generations per run")
    ap.add_argument("--backbone", default="int8", help="dymoe backbone precisions (comma list)")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="SOURCE_TREE",
                    help="a llama.cpp source tree to build and use instead of the pinned download")
    args = ap.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    if len(depths) < 2:
        raise SystemExit("--layers needs at least two depths to split per-layer from fixed cost")
    src = args.llama_cpp or llama_cpp_source()
    bindir = build(src)
    ckpts = {n: checkpoint(n) for n in depths}
    ggufs = {n: gguf_q4_0(src, bindir, ckpts[n]) for n in depths}
    # this machine is shared: rounds alternate the depths so that drift hits each alike, then medians
    rounds: dict[int, list[dict]] = {n: [] for n in depths}
    for _ in range(args.rounds):
        for n in depths:
            rounds[n].append(llama_bench(bindir, ggufs[n], args.threads, args.tokens, args.repeats))
    engines = {"llama.cpp Q4_0": [med([r["ms_per_token"] for r in rounds[n]]) for n in depths]}
    detail = {"llama.cpp Q4_0": [{"layers": n, "rounds": rounds[n]} for n in depths]}
    deepest: dict[str, dict] = {}  # dymoe's profile (seconds) at the largest depth
    for n in depths:
        vocab = json.loads((ckpts[n] / "config.json").read_text())["vocab_size"]
        prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, args.prompt)]
        for bb in args.backbone.split(","):
            name = f"dymoe int4, {bb} backbone"
            p = profile(dymoe_bundle(ckpts[n], bb), "int4", prompt, args.tokens, args.rounds, threads=args.threads)
            engines.setdefault(name, []).append(p["total"] * 1e3)
            counts = ("calls", "layers", "moe_layers", "top_k")
            detail.setdefault(name, []).append({k: v if k in counts else v * 1e3 for k, v in p.items()})
            deepest[name] = p
    rows, out = [], {"threads": args.threads, "tokens": args.tokens, "prompt": args.prompt,
                     "llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "engines": {}}
    slope, intercept = fit(depths, engines["llama.cpp Q4_0"])
    base = intercept + FULL_LAYERS * slope
    for name, ms in engines.items():
        slope, intercept = fit(depths, ms)
        full = intercept + FULL_LAYERS * slope
        entry = {"ms_per_token": dict(zip(depths, ms, strict=True)), "per_layer_ms": slope, "fixed_ms": intercept,
                 f"extrapolated_{FULL_LAYERS}_ms": full, "runs": detail[name]}
        by_parts = ""
        if name in deepest:  # dymoe also times its parts: scale the deepest run's per-layer parts
            entry[f"by_parts_{FULL_LAYERS}_ms"] = by_parts = extrapolate(deepest[name], FULL_LAYERS)["total"] * 1e3
        out["engines"][name] = entry
        rows.append([name, *ms, slope, intercept, full, full / base, by_parts,
                     by_parts / base if by_parts else ""])
    show(f"all-resident decode, {args.threads} threads, {args.tokens} tokens after {args.prompt} "
         f"(Qwen3-30B-A3B shapes; ms per token; llama.cpp medians of {args.rounds} runs)",
         ["engine", *[f"{n} layers" for n in depths], "per layer", "fixed", f"{FULL_LAYERS} layers (fit)",
          "vs llama.cpp", f"{FULL_LAYERS} layers (parts)", "vs llama.cpp "], rows)
    write_json("llama_cpp_decode", out)


if __name__ == "__main__":
    main()
