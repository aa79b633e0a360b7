"""The ``dymoe`` command line: a thin Typer layer over the library API.

Errors a user can fix are printed as two short lines (what, and what to do) with exit status 1;
status 2 stays with Typer for command-line usage errors.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dymoe import defaults
from dymoe.errors import DymoeError

app = typer.Typer(
    name="dymoe",
    help="Run Mixture-of-Experts models on devices whose memory cannot hold them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


def friendly(fn):
    """Turn DymoeError into a clean message and exit status 1; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DymoeError as e:
            err.print(f"[bold red]error:[/] {e.message}", highlight=False)
            if e.hint:
                err.print(f"  [dim]hint:[/] {e.hint}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("\n[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
@friendly
def export(
    model: Annotated[str, typer.Argument(help="Hugging Face checkpoint folder, or a hub id (needs huggingface_hub).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    precisions: Annotated[str, typer.Option(
        help="Comma list from fp32, fp16, int8, int4, int2.")] = ",".join(defaults.PRECISIONS),
    block_size: Annotated[int, typer.Option(help="Quantization block along the input features.")] = defaults.BLOCK_SIZE,
    workers: Annotated[int, typer.Option(help="Parallel processes for expert quantization.")] = defaults.EXPORT_WORKERS,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle or unfinished export.")] = False,
) -> None:
    """Export a checkpoint to a bundle: one ONNX graph per expert and precision, the backbone,
    the tokenizer and manifest.json. An interrupted export resumes when rerun.

    Example: dymoe export ./Qwen3-30B-A3B --out bundles/qwen3 --precisions fp16,int4,int2 --workers 2
    """
    from dymoe.toolchain.export import ExportOptions
    from dymoe.toolchain.export import export as run_export

    t0 = time.perf_counter()
    opts = ExportOptions(precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                         block_size=block_size, workers=workers, force=force, progress=sys.stderr.isatty())
    try:
        manifest = run_export(model, out, opts)
    except KeyboardInterrupt:
        raise DymoeError(f"export to {out} interrupted; finished files are kept",
                         "rerun the same command to resume") from None
    total = sum(f.bytes for f in manifest.files.values())
    err.print(f"wrote {out} ({_mib(total)}, {len(manifest.files)} files) in {time.perf_counter() - t0:.1f} s")


@app.command()
@friendly
def info(bundle: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
    """Summarise a bundle: architecture, layers, experts, sizes and errors per precision.

    Example: dymoe info bundles/qwen3
    """
    from dymoe.manifest import read_manifest

    m = read_manifest(bundle)
    s = m.model
    facts = Table(show_header=False, box=None)
    for k, v in [
        ("architecture", s.model_type), ("source", m.source.model), ("layers", s.num_layers),
        ("experts", f"{s.num_experts} per layer, top-{s.top_k}"
         + (f", shared expert ({s.shared_intermediate_size})" if s.shared_intermediate_size else "")),
        ("hidden / expert intermediate", f"{s.hidden_size} / {s.expert_intermediate_size}"),
        ("attention", f"{s.num_heads} heads, {s.num_kv_heads} kv heads, head_dim {s.head_dim}"),
        ("context", s.max_position_embeddings), ("vocabulary", s.vocab_size),
        ("quantization", f"{m.quantization.method}, block {m.quantization.block_size}"),
        ("source weights", _mib(m.source.source_bytes)),
    ]:
        facts.add_row(f"[bold]{k}[/]", str(v))
    out.print(facts)
    table = Table(title="per precision")
    for col in ("precision", "format", "experts on disk", "mean weight err", "mean output err"):
        table.add_column(col, justify="right")
    backbone = [m.backbone.embed, *m.backbone.layers, m.backbone.head]
    for p in m.quantization.precisions:
        vs = [e.variants[p] for e in m.experts]
        size = sum(m.files[v.path].bytes for v in vs)
        table.add_row(p, m.quantization.formats[p], _mib(size),
                      f"{sum(v.weight_rel_error for v in vs) / len(vs):.4f}",
                      f"{sum(v.output_rel_error for v in vs) / len(vs):.4f}")
    out.print(table)
    out.print(f"backbone (resident): {_mib(sum(m.files[r].bytes for r in backbone))}")


@app.command()
@friendly
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = defaults.MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    precision: Annotated[str | None, typer.Option(
        help="Run every expert at this precision (default: the bundle's highest).")] = None,
    metrics_json: Annotated[Path | None, typer.Option(help="Write timings, prompt and token ids here.")] = None,
) -> None:
    """Generate text from a bundle, streaming it to the terminal.

    Example: dymoe run bundles/qwen3 --prompt "The capital of France is" --max-new-tokens 32
    """
    from dymoe.runtime.session import open_model

    session = open_model(bundle, precision=precision, progress=sys.stderr.isatty())
    result = session.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, stream=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sys.stdout.write("\n")
    metrics = session.metrics(result)
    err.print(f"[dim]{metrics['new_tokens']} tokens | TTFT {metrics['ttft_s'] * 1e3:.1f} ms | "
              f"TPOT {metrics['tpot_s'] * 1e3:.1f} ms | experts {metrics['precision']} | "
              f"stop: {metrics['stop_reason']}[/]", highlight=False)
    if metrics_json:
        from dymoe.fsutil import atomic_write_text

        atomic_write_text(metrics_json, json.dumps(metrics, indent=1) + "\n")


@app.command()
@friendly
def demo() -> None:
    """Export the shipped demo model and run it (arrives with the demo-model issue).

    Example: dymoe demo
    """
    err.print("dymoe demo: not yet — the shipped demo model arrives in a later release. "
              "Meanwhile: dymoe export MODEL_DIR --out BUNDLE && dymoe run BUNDLE --prompt TEXT")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
