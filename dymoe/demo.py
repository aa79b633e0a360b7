"""``dymoe demo``: the main job on the model that ships with dymoe, with no download.

Exports the shipped model to a bundle in the user cache (reused once complete, resumed if
interrupted), streams a generation, shows what happened in a table, then compares LRU
offloading with DyMoE at a budget that forces offloading.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from dymoe.bundle.errors import DymoeError
from dymoe.bundle.paths import resolve_file
from dymoe.bundle.progress import ProgressFn

DEMO_BUDGET = "10%"  # of the fp16 experts: small enough that LRU offloading thrashes
DEMO_PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
DEMO_PROMPT = "The for statement is used to"
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


def demo_bundle_dir(model: Path | None = None) -> Path:
    """Where the demo keeps the bundle of ``model`` (default: the shipped one), by content and
    bundle format."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dymoe" / "demo"
    return base / f"bundle-{_digest(model or demo_model_dir())}"


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


def run_demo(console, err, model: Path | None = None, budget: str = DEMO_BUDGET, max_new_tokens: int = 48,
             progress: ProgressFn | None = None) -> dict:
    """The whole demo; returns what it printed as numbers (for tests)."""
    import sys

    from rich.table import Table

    from dymoe.bundle.manifest import read_manifest
    from dymoe.runtime.bench import BenchOptions, run_bench
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import PolicyRun
    from dymoe.tables import print_tables

    bundle = ensure_demo_bundle(model, progress=progress)
    heldout = (Path(model) if model else demo_model_dir()) / "heldout.txt"
    m = read_manifest(bundle)
    err.print(f"[bold]dymoe demo[/]: {m.model.model_type}, {m.model.num_layers} layers x {m.model.num_experts} "
              f"experts (top-{m.model.top_k}); bundle {bundle}")
    err.print(f"[bold]1. generate[/] under a budget of {budget} of the fp16 experts, policy dymoe "
              "(mixed precision 4/2, cosine depth schedule, look-ahead prefetch), reading experts "
              f"from storage as an emulated {DEMO_STORAGE} would\n")
    plan = PolicyRun("dymoe", budget, io="direct", storage_profile=DEMO_STORAGE, full_precision="fp16")
    session = open_model(bundle, policy=plan)
    try:
        console.print(DEMO_PROMPT, end="", style="bold", highlight=False)
        result = session.generate(DEMO_PROMPT, max_new_tokens=max_new_tokens,
                                  stream=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        console.print()
        metrics = session.metrics(result)
    finally:
        session.close()
    table = Table(title="what happened")
    table.add_column("")
    table.add_column("", justify="right")
    sizes = {p: sum(m.files[e.variants[p].path].bytes for e in m.experts) for p in m.quantization.precisions}
    for p, size in sizes.items():
        table.add_row(f"experts at {p} on disk", f"{size / 2**20:.1f} MiB")
    table.add_row("expert budget (resident)", f"{metrics['budget_bytes'] / 2**20:.1f} MiB "
                  f"(peak {metrics['peak_resident_bytes'] / 2**20:.1f})")
    table.add_row("time to first token", f"{metrics['ttft_s'] * 1e3:.0f} ms")
    table.add_row("time per output token", f"{metrics['tpot_s'] * 1e3:.1f} ms")
    table.add_row("cache hit rate / prefetch recall",
                  f"{metrics['hit_rate']:.2f} / {metrics['prefetch_recall'] or 0:.2f}")
    table.add_row("peak RSS", f"{metrics['peak_rss_bytes'] / 2**20:.0f} MiB")
    console.print(table)
    err.print("\n[bold]2. compare[/] LRU offloading with DyMoE at the same budget (speed and held-out "
              "perplexity)\n")
    opts = BenchOptions(["lru", "dymoe"], [budget],
                        base=PolicyRun("lru", io="direct", storage_profile=DEMO_STORAGE, full_precision="fp16"),
                        new_tokens=16, repeats=1, accuracy=heldout.is_file(),
                        data=heldout if heldout.is_file() else None, window=64, windows=2)
    opts.prompts = [DEMO_PROMPT]
    bench = run_bench(bundle, opts)
    print_tables(bench, console)
    return {"bundle": str(bundle), "generation": metrics, "bench": bench}
