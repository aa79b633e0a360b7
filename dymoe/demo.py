"""``dymoe demo``: the main job on the model that ships with dymoe, with no download.

Exports the shipped model to a bundle in the user cache (reused once complete, resumed if
interrupted), streams a generation under a budget that forces offloading, then compares LRU
offloading with DyMoE at that budget over several interleaved runs and says, from the numbers
it measured, what they show (``demo_report``).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from dymoe.bundle.errors import DymoeError
from dymoe.bundle.paths import resolve_file
from dymoe.bundle.progress import ProgressFn

# a share of what every expert costs resident at DEMO_FULL_PRECISION (measured): small enough
# that LRU offloading of full-precision experts thrashes
DEMO_BUDGET = "10%"
DEMO_FULL_PRECISION = "fp16"  # what LRU loads, and what the budget's share is of
DEMO_PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
DEMO_PROMPT = "The for statement is used to"
# the comparison: each run's warm phase answers the other prompt, as a session's next request would
DEMO_BENCH_PROMPTS = ("The for statement is used to", "Open the file and return")
DEMO_REPEATS = 4  # rounds: 8 runs per policy, enough for the paired comparison to hold from run to run
DEMO_WINDOWS = 3  # held-out windows of 64 tokens scored per policy
# dymoe demo --widen K: the same model with experts K times larger (toolchain/widen.py)
WIDEN_SUGGESTED = 8  # 584 KiB experts at fp16; its export takes about half a minute on 2 cores
WIDENED_PRECISIONS = ("fp16", "int4", "int2")
WIDENED_REPEATS = 2  # larger experts make each run slower: 4 runs per policy
DEMO_STORAGE = "orin-nano-nvme"  # emulated, with --io direct: loads cost what they would on a Jetson


def demo_model_dir() -> Path:
    folder = Path(str(resources.files("dymoe.models") / "demo"))
    if not (folder / "config.json").is_file():
        raise DymoeError(f"the shipped demo model is missing from {folder}",
                         "reinstall dymoe, or check out the repository with its models/ folder")
    return folder


def _digest(folder: Path) -> str:
    from dymoe.bundle.manifest import SCHEMA_VERSION
    from dymoe.toolchain.options import BACKBONE_PRECISION

    # a new bundle format, or a new default backbone precision, exports anew
    h = hashlib.sha256(f"schema {SCHEMA_VERSION} backbone {BACKBONE_PRECISION}".encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dymoe" / "demo"


def demo_bundle_dir(model: Path | None = None) -> Path:
    """Where the demo keeps the bundle of ``model`` (default: the shipped one), by content and
    bundle format."""
    return _cache_root() / f"bundle-{_digest(model or demo_model_dir())}"


def demo_heldout_for(bundle: Path) -> Path | None:
    """The demo's held-out text when ``bundle`` uses the demo tokenizer, else None."""
    try:
        folder = demo_model_dir()
    except DymoeError:
        return None
    try:
        ours = resolve_file(Path(bundle), "tokenizer/tokenizer.json")
    except DymoeError:
        return None
    if ours.read_bytes() == (folder / "tokenizer.json").read_bytes():
        return folder / "heldout.txt"
    return None


def ensure_demo_bundle(model: Path | None = None, progress: ProgressFn | None = None) -> Path:
    """Export ``model`` (default: the shipped one) once; later calls reuse the complete bundle,
    and an interrupted export is resumed."""
    from dymoe.bundle.naming import MANIFEST_NAME
    from dymoe.toolchain.export import export
    from dymoe.toolchain.options import ExportOptions

    source = Path(model) if model else demo_model_dir()
    out = demo_bundle_dir(source)
    if not (out / MANIFEST_NAME).is_file():
        export(str(source), out, ExportOptions(precisions=DEMO_PRECISIONS, progress=progress))
    return out


def ensure_widened_bundle(factor: int, progress: ProgressFn | None = None) -> Path:
    """The shipped model widened ``factor`` times (``toolchain/widen.py``: every expert neuron
    copied, so the function and the trained routing are unchanged and the experts are ``factor``
    times larger), exported once with rtn at fp16/int4/int2, the quickest export that still gives
    LRU a full precision and dymoe its 4/2 ladder. The float32 checkpoint in between is deleted."""
    import os
    import shutil

    from dymoe.bundle.naming import MANIFEST_NAME
    from dymoe.toolchain.export import export
    from dymoe.toolchain.options import ExportOptions
    from dymoe.toolchain.widen import widen_checkpoint

    source = demo_model_dir()
    base = _cache_root() / f"widened-k{factor}-{_digest(source)}"
    out = base / "bundle"
    if not (out / MANIFEST_NAME).is_file():
        ckpt = base / "checkpoint"
        shutil.rmtree(ckpt, ignore_errors=True)  # rebuilt whole (a second): a half-written one is never read
        widen_checkpoint(source, ckpt, factor)
        export(str(ckpt), out, ExportOptions(precisions=WIDENED_PRECISIONS, quantizer="rtn",
                                             workers=min(2, os.cpu_count() or 1), progress=progress))
        shutil.rmtree(ckpt, ignore_errors=True)
    return out


def _short(path: Path) -> str:
    """A path as a reader types it: the home folder as ``~`` (the cache path is long)."""
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + "/") else str(path)


def run_demo(console, err, model: Path | None = None, budget: str = DEMO_BUDGET, max_new_tokens: int = 48,
             progress_scope=None, widen: int | None = None) -> dict:
    """The whole demo; returns what it measured (for tests). ``progress_scope()`` gives a context
    manager yielding a progress listener; it is entered only around work with nothing else to show
    (exporting, comparing), never while the generated text streams to stdout."""
    import contextlib
    import functools
    import sys
    import time

    from dymoe.bundle.manifest import read_manifest
    from dymoe.demo_report import bullets, conclusion, medians_note, speed_table
    from dymoe.runtime.bench import BenchOptions, run_bench
    from dymoe.runtime.build import plan
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import PolicyRun

    if widen is not None and model is not None:
        raise DymoeError("--widen widens the shipped demo model, not --model", "drop one of them")
    scope = progress_scope or (lambda: contextlib.nullcontext(None))
    folder = Path(model) if model else demo_model_dir()
    repeats = WIDENED_REPEATS if widen else DEMO_REPEATS
    t0 = time.perf_counter()
    with scope() as progress:
        bundle = ensure_widened_bundle(widen, progress) if widen else ensure_demo_bundle(model, progress=progress)
    took = time.perf_counter() - t0
    m = read_manifest(bundle)
    s = m.model
    fp = DEMO_FULL_PRECISION if DEMO_FULL_PRECISION in m.quantization.precisions else m.quantization.precisions[0]
    n_experts = len(m.experts)
    on_disk = sum(m.files[e.variants[fp].path].bytes for e in m.experts)
    say = functools.partial(err.print, highlight=False, soft_wrap=False)  # prose wraps at words, not mid-word
    say(f"[bold]dymoe demo[/]: {s.model_type}, {s.num_layers} layers x {s.num_experts} experts, top-{s.top_k}: "
              f"{n_experts} experts of {on_disk / n_experts / 1024:.0f} KiB each at {fp}."
              + (f" The shipped demo model widened {widen} times: the same function and trained routing, "
                 f"experts {widen} times larger (Qwen3-30B-A3B's are 9 MiB)." if widen else
                 " A toy model: times are milliseconds, and they show the mechanism, not a device's speed."
                 if model is None else ""))
    say(f"bundle: {_short(bundle)} ({'exported in ' + f'{took:.1f} s' if took > 1 else 'reused'})")

    base = PolicyRun("dymoe", budget, io="direct", storage_profile=DEMO_STORAGE, full_precision=fp)
    _, costs, budget_bytes = plan(Bundle(bundle), base)  # measures what an engine costs here (once per bundle)
    every = costs.resident[fp] * n_experts
    fit = budget_bytes // costs.resident[fp]
    say(f"\n[bold]1. Generate[/] with policy dymoe under --budget {budget}: {_mib(budget_bytes)} for "
              f"resident experts, {budget} of the {_mib(every)} that all {n_experts} cost resident at {fp} on "
              f"this machine (measured: on the CPU ONNX Runtime holds fp16 weights as fp32; their files are "
        f"{_mib(on_disk)}). That holds {fit} {fp} experts; each "
              f"token needs {s.top_k} per layer. Experts are read from storage as an emulated {DEMO_STORAGE} "
        "would (--io direct).\n")
    session = open_model(bundle, policy=base)
    try:
        console.print(DEMO_PROMPT, end="", style="bold", highlight=False)
        result = session.generate(DEMO_PROMPT, max_new_tokens=max_new_tokens,
                                  stream=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        console.print()
        metrics = session.metrics(result)
    finally:
        session.close()
    console.print(_generation_table(metrics))

    heldout = folder / "heldout.txt"
    opts = BenchOptions(["lru", "dymoe"], [budget], base=PolicyRun("lru", io="direct", storage_profile=DEMO_STORAGE,
                                                                       full_precision=fp),
                        prompts=list(DEMO_BENCH_PROMPTS), new_tokens=16, repeats=repeats,
                        accuracy=heldout.is_file(), data=heldout if heldout.is_file() else None,
                        window=64, windows=DEMO_WINDOWS)
    runs = repeats * len(DEMO_BENCH_PROMPTS)
    say(f"\n[bold]2. Compare[/] LRU offloading ({fp} experts, least recently used evicted) with dymoe at "
        f"the same budget: {runs} runs each, alternating, then held-out perplexity.")
    with scope() as progress:
        bench = run_bench(bundle, opts, progress)
    console.print(speed_table(bench["results"][0], opts.policies))
    console.print(medians_note(bench), highlight=False, soft_wrap=False)
    console.print("\n[bold]What this shows[/]")
    console.print(bullets(conclusion(bench, s.top_k * len(s.moe_layers))), highlight=False)
    if not widen and model is None:
        say(f"\nWith experts {WIDEN_SUGGESTED} times larger and the same trained routing: dymoe demo --widen "
            f"{WIDEN_SUGGESTED} (builds that model once, about half a minute on 2 cores).")
    return {"bundle": str(bundle), "generation": metrics, "bench": bench}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _generation_table(m: dict):
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    for k, v in (("time to first token", f"{m['ttft_s'] * 1e3:.0f} ms"),
                 ("time per output token", f"{m['tpot_s'] * 1e3:.1f} ms ({m['new_tokens']} tokens)"),
                 ("expert cache hit rate", f"{m['hit_rate']:.2f}"),
                 ("prefetched experts that were used", "-" if m.get("prefetch_precision") is None
                  else f"{m['prefetch_precision']:.2f}"),
                 ("read from storage per token", f"{m['bytes_read_per_token'] / 2**20:.2f} MiB"),
                 ("resident experts, peak", f"{_mib(m['peak_resident_bytes'])} of {_mib(m['budget_bytes'])}"),
                 ("process memory (peak RSS)", _mib(m["peak_rss_bytes"]))):
        t.add_row(k, v)
    return t
