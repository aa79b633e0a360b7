"""Where an export's time goes: the exporter's own per-file tasks run here under cProfile, and
their CPU time is split into stages by the functions that do each one (cumulative time, so a
stage includes what it calls; the stages do not nest). ``total`` is CPU, ``wall`` the clock."""

from __future__ import annotations

import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from _common import show

# stage -> (file suffix or "~" for built-ins, function name); first match wins
STAGES = {
    "read": [("checkpoint.py", "read")],
    "quantize": [("quantizers.py", "quantize_expert")],
    "graph": [("expert_graph.py", "build_expert_model"), ("trt_graph.py", "build_fp16_model"),
              ("base.py", "embed_graph"), ("base.py", "head_graph")],
    "serialise": [("~", "SerializeToString"), ("proto_stream.py", "serialise_chunks")],
    "sha256": [("~", "openssl_sha256"), ("~", "update' of '_hashlib.HASH")],
    "write": [("~", "write' of '_io.BufferedWriter"), ("~", "posix.write")],
    "fsync": [("~", "posix.fsync")],
}


def stages(prof: cProfile.Profile, total: float) -> dict[str, float]:
    raw = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    out = dict.fromkeys(STAGES, 0.0)
    for (file, _, name), (_, _, _, cum, _) in raw.items():
        for stage, keys in STAGES.items():
            if any(file.endswith(f) and (n in name if f == "~" else name == n) for f, n in keys):
                out[stage] += cum
                break
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def timed(fn, *args) -> dict[str, float]:
    """CPU seconds per stage (robust to other work on a shared machine; waiting on the disk shows
    only in the wall-clock total) and the wall-clock total."""
    prof = cProfile.Profile(time.process_time)
    t0, c0 = time.perf_counter(), time.process_time()
    prof.runcall(fn, *args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {**stages(prof, cpu), "wall": wall}


def profile_experts(src: Path, n: int, precisions: tuple[str, ...], quantizer: str) -> dict:
    """Median CPU seconds per stage of one expert's variants, each profiled apart inside the
    exporter's own per-expert task (so later precisions reuse what the first derived, as they do
    in an export), over experts 1..n of layer 0 (expert 0 warms up). ``read`` is the expert's."""
    import dymoe.toolchain.export as export
    from dymoe.toolchain.blas import set_blas_threads
    from dymoe.toolchain.options import ExportOptions
    from dymoe.toolchain.quantizers import QuantizerOptions

    set_blas_threads(1)  # as the exporter runs
    ck = export.open_checkpoint(str(src))
    opts = ExportOptions(quantizer=quantizer)
    layer = ck.spec.moe_layers[0]
    runs: list[dict[str, dict]] = []
    real_write, real_read = export.write_expert, export._read

    def write(*args, **kw):  # one variant, profiled on its own
        got: dict = {}
        t = timed(lambda: got.update(r=real_write(*args, **kw)))
        runs[-1][args[5]] = t  # write_expert(out, rel, gate, up, down, precision, ...)
        return got["r"]

    def read(*args):
        t0 = time.process_time()
        try:
            return real_read(*args)
        finally:
            runs[-1]["read"]["total"] += time.process_time() - t0

    export.write_expert, export._read = write, read
    try:
        with tempfile.TemporaryDirectory(dir=src.parent) as out:
            for e in range(n + 1):
                runs.append({"read": {"total": 0.0}})
                export._expert_task(str(src), out, export._expert_refs(ck.mapping, layer, e), layer, e, precisions,
                                    opts.block_size, QuantizerOptions(quantizer), opts.formats)
    finally:
        export.write_expert, export._read = real_write, real_read
    runs = runs[1:]
    table = {p: {k: statistics.median(r[p][k] for r in runs) for k in runs[0][p]} for p in precisions}
    table["all"] = {k: sum(t[k] for t in table.values()) for k in table[precisions[0]]}
    table["all"]["read"] = statistics.median(r["read"]["total"] for r in runs)
    table["all"]["total"] += table["all"]["read"]
    table["all"]["wall"] += table["all"]["read"]
    _show(f"CPU ms per expert and precision (median of {n} experts; 'all' adds the expert's read)", table)
    return table


def _show(title: str, table: dict[str, dict[str, float]]) -> None:
    """Stages as rows, so that the columns fit a terminal."""
    stages_ = list(next(iter(table.values())))
    show(title, ["stage", *table], [[st, *(f"{t[st] * 1e3:,.1f}" for t in table.values())] for st in stages_])


def profile_backbone(src: Path) -> dict:
    """Seconds per stage of the embedding and the LM head graphs (the backbone's bulk)."""
    from dymoe.toolchain.export import _backbone_task, open_checkpoint

    ck = open_checkpoint(str(src))
    table = {}
    with tempfile.TemporaryDirectory(dir=src.parent) as out:
        for what in ("embed", "head"):
            table[what] = timed(_backbone_task, str(src), out, ck.spec.model_type, ck.settings, ck.mapping, what, None)
    _show("CPU ms per backbone graph (this process)", table)
    return table
