"""The backbone at each ``--backbone-precision`` on the shipped demo model: what it costs (disk, resident
memory, decode time) and what it changes (held-out perplexity, top-1 agreement and relative logit
error against the float32 backbone).

Every expert at one precision (fp32, so that the backbone alone differs; then int4, the precision a
budgeted run mostly serves, to set the backbone's error beside the experts'), held-out perplexity
over all of models/demo/heldout.txt in windows of 256 (the README's protocol), ONNX Runtime's default
CPU kernels. Resident memory and step times come from a fresh process per bundle (``_backbone.py``).

    python benchmarks/backbone_precision.py [--windows N] [--quantizer hqq|rtn]

Prints a table and writes results/backbone_precision.json.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from _backbone import measure_in_fresh_process
from _common import CACHE, show, write_json

WINDOW = 256
BACKBONE = ("fp32", "fp16", "int8", "int4")


def export_demo(out: Path, backbone: str, experts: str, quantizer: str) -> Path:
    from dymoe.demo import demo_model_dir
    from dymoe.toolchain.export import ExportOptions, export

    shutil.rmtree(out, ignore_errors=True)
    export(str(demo_model_dir()), out, ExportOptions(precisions=(experts,), quantizer=quantizer,
                                                     backbone_precision=backbone))
    return out


def scores(bundle: Path, precision: str, ids: list[int], windows: int | None):
    """Perplexity and the logits of every scored position (for agreement and logit error)."""
    from dymoe.runtime.evaluate import windows as cut
    from dymoe.runtime.maths import log_softmax
    from dymoe.runtime.model_session import open_model

    session = open_model(bundle, precision=precision)
    logits, nll, n = [], 0.0, 0
    for chunk in cut(ids, WINDOW, windows):
        out = session.model.forward(np.asarray(chunk), session.model.new_cache(), all_logits=True)[:-1]
        target = np.asarray(chunk[1:])
        nll -= float(log_softmax(out)[np.arange(len(target)), target].sum())
        n += len(target)
        logits.append(out)
    session.close()
    return float(np.exp(nll / n)), np.concatenate(logits), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=None, help="held-out windows of 256 (default: all)")
    ap.add_argument("--quantizer", default="hqq", help="what chooses the integer codes (the export default: hqq)")
    a = ap.parse_args()
    from dymoe.bundle.manifest import read_manifest
    from dymoe.demo import demo_model_dir
    from dymoe.runtime.device_memory import backbone_bytes
    from dymoe.runtime.tokenizer import TextTokenizer

    folder = demo_model_dir()
    ids = TextTokenizer(folder / "tokenizer.json").encode((folder / "heldout.txt").read_text(encoding="utf-8"))
    rows, results = [], []
    for experts in ("fp32", "int4"):
        ref = None
        for backbone in BACKBONE:
            t0 = time.perf_counter()
            b = export_demo(CACHE / "backbone" / f"{backbone}-{experts}", backbone, experts, a.quantizer)
            export_s = time.perf_counter() - t0
            m = read_manifest(b)
            bb = m.backbone
            disk = sum(m.files[r].bytes + sum(m.files[d].bytes for d in bb.external_data.get(r, ()))
                       for r in bb.graphs())
            ppl, logits, n = scores(b, experts, ids, a.windows)
            if ref is None:
                ref = (ppl, logits) if backbone == "fp32" else None
            cost = measure_in_fresh_process(b)
            step = sum(cost["step_ms"][r] for r in [bb.embed, *bb.layers, bb.head])
            r = {"experts": experts, "backbone": backbone, "embedding": bb.embedding, "lm_head": bb.lm_head,
                 "disk_bytes": disk, "resident_estimate_bytes": backbone_bytes(m),
                 "resident_rss_bytes": sum(cost["rss_bytes"].values()), "decode_step_ms": step,
                 "ppl": ppl, "ppl_change": ppl / ref[0] - 1,
                 "top1_agreement": float((logits.argmax(-1) == ref[1].argmax(-1)).mean()),
                 "logit_rel_error": float(np.linalg.norm(logits - ref[1]) / np.linalg.norm(ref[1])),
                 "tokens": n, "export_s": export_s}
            results.append(r)
            rows.append([experts, backbone, f"{bb.embedding}/{bb.lm_head}", f"{disk / 2**20:.2f}",
                         f"{r['resident_rss_bytes'] / 2**20:.1f}", f"{step:.2f}", f"{ppl:.3f}",
                         f"{100 * r['ppl_change']:+.2f} %", f"{100 * r['top1_agreement']:.2f} %",
                         f"{100 * r['logit_rel_error']:.2f} %"])
    show(f"demo model, backbone precision ({a.quantizer}; held-out windows of {WINDOW}, {results[0]['tokens']} tokens)",
         ["experts", "backbone", "embed/head", "MiB on disk", "MiB resident (RSS)", "decode step ms", "perplexity",
          "vs fp32 backbone", "top-1 agreement", "logit error"], rows)
    write_json("backbone_precision", {"quantizer": a.quantizer, "window": WINDOW, "results": results})


if __name__ == "__main__":
    main()
