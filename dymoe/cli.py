"""The ``dymoe`` command line: a thin Typer layer over the library API.

Errors a user can fix are printed as two short lines (what, and what to do) with exit status 1;
status 2 stays with Typer for command-line usage errors.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dymoe.bundle.errors import DymoeError, InputError
from dymoe.bundle.naming import INPUTS_DIRNAME, REPORT_DIRNAME
from dymoe.calibration import options as cal_defaults
from dymoe.console import reporter
from dymoe.demo import DEMO_BUDGET
from dymoe.help import Command, reflow
from dymoe.runtime import options as run_defaults
from dymoe.serve import options as serve_defaults
from dymoe.targets import providers as device_defaults
from dymoe.toolchain import options as export_defaults

app = typer.Typer(
    name="dymoe",
    help=reflow("""Run Mixture-of-Experts models on devices whose memory cannot hold them.

    Start with `dymoe demo`: it exports the small model that ships with dymoe and compares LRU
    offloading with DyMoE under a memory budget. `dymoe COMMAND --help` explains each command."""),
    invoke_without_command=True,  # bare `dymoe` shows the help and succeeds (see _main)
    add_completion=False,
    pretty_exceptions_enable=False,
)
command = functools.partial(app.command, cls=Command)  # reflowed help, MODEL-style usage (dymoe/help.py)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from dymoe import __version__

        print(f"dymoe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context, version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    if ctx.invoked_subcommand is None:  # asking for nothing is asking what there is: not a usage error
        print(ctx.get_help())
        raise typer.Exit()


# wide tables stay readable when piped into a file or a CI log
out = Console() if Console().is_terminal else Console(width=200)


def friendly(fn):
    """Turn DymoeError into a clean message and exit status 1; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DymoeError as e:
            _fail(e)
        except OSError as e:
            if os.environ.get("DYMOE_TRACEBACK"):
                raise
            _fail(_os_error(e))
        except MemoryError:
            if os.environ.get("DYMOE_TRACEBACK"):
                raise
            _fail(DymoeError("ran out of memory", "free memory, or use a smaller --budget / fewer --workers"))
        except KeyboardInterrupt:
            err.print("\n[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _fail(e: DymoeError):
    # escaped: a message may hold brackets that rich would read as markup ("pip install 'dymoe[serve]'")
    err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False)
    if e.hint:
        err.print(f"  [dim]hint:[/] {escape(e.hint)}", highlight=False)
    raise typer.Exit(1) from None


def _os_error(e: OSError) -> DymoeError:
    """The last line of defence: an operating-system error no check foresaw, said plainly."""
    from dymoe.bundle.fsutil import disk_full_error

    where = f": {e.filename}" if e.filename else ""
    if (full := disk_full_error(e, "writing")) is not None:
        return full
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return DymoeError(f"permission denied{where}", "check the owner and mode of that file or folder, "
                                                       "or choose one you can read and write")
    return DymoeError(f"{e.strerror or e.__class__.__name__}{where}", "check the path, the disk and its permissions")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# where graphs run: the same three options on run, bench and eval (serve takes an ExecutionTarget)
DeviceOption = Annotated[str, typer.Option(
    help="Where the graphs run: cpu, cuda (ONNX Runtime's CUDA provider) or tensorrt (TensorRT for the expert "
         "forms it runs, CUDA for the rest). cuda and tensorrt need onnxruntime-gpu and an NVIDIA GPU.")]
TargetOption = Annotated[str | None, typer.Option(
    "--target", help="Device profile: orin-nano-8gb, orin-nx-16gb, agx-orin-64gb or a .toml file (provider options; "
                     "the budget must fit its usable memory).")]
EnginesOption = Annotated[str | None, typer.Option(
    help="With --device tensorrt: prebuilt engines from dymoe build-engines, a folder or auto (the profile's).")]


def _target(device: str, target: str | None, engines: str | None):
    from dymoe.runtime.execution import execution_target

    return execution_target(device, target, engines)


@command()
@friendly
def export(
    model: Annotated[str, typer.Argument(help="Hugging Face checkpoint folder, or a hub id (needs huggingface_hub).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    precisions: Annotated[str, typer.Option(
        help="Comma list from fp32, fp16, int8, int4, int2.")] = ",".join(export_defaults.PRECISIONS),
    block_size: Annotated[int, typer.Option(
        help="Quantization block along the input features.")] = export_defaults.BLOCK_SIZE,
    workers: Annotated[int, typer.Option(help="Parallel processes for expert quantization.")] = export_defaults.WORKERS,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle or unfinished export.")] = False,
    quantizer: Annotated[str, typer.Option(
        help="How integer codes are chosen: rtn (round to nearest), hqq (optimised scales, no data) or gptq "
             "(error compensation with each expert's routed inputs; needs --calibration-data).")
    ] = export_defaults.QUANTIZER,
    calibration_data: Annotated[list[Path] | None, typer.Option(
        help="gptq only: text file(s), JSON Lines or folders to collect the experts' inputs from (repeatable).")
    ] = None,
    gptq_min_tokens: Annotated[int, typer.Option(
        help="gptq only: experts routed fewer calibration tokens fall back to hqq (recorded in the manifest).")
    ] = export_defaults.GPTQ_MIN_TOKENS,
    inputs_per_expert: Annotated[int, typer.Option(
        metavar="N", help="gptq only: routed hidden states kept per expert; memory about layers x experts x N x "
                          "hidden x 2 bytes.")] = cal_defaults.INPUTS_PER_EXPERT,
    target: Annotated[str, typer.Option(
        help="ONNX forms: ort (portable; asymmetric int4/int8 blocks of --block-size) or tensorrt (symmetric INT4 "
             "with fp16 scales in blocks of 128, fp16 arithmetic, MatMulNBits int8/int2 for the CUDA provider).")
    ] = export_defaults.TARGET,
    backbone_precision: Annotated[str, typer.Option(
        help="The backbone's linear weights (attention, shared experts, dense MLPs): fp32, fp16, int8 or int4, "
             "quantized like the experts; the embedding table and LM head follow, at most int8; norms and routers "
             "stay float32.")] = export_defaults.BACKBONE_PRECISION,
) -> None:
    """Export a checkpoint to a bundle of per-expert ONNX graphs.

    One ONNX graph per expert and precision, the backbone, the tokenizer and manifest.json.
    An interrupted export resumes when the same command is rerun.

    Examples:
      dymoe export ./Qwen3-30B-A3B --out bundles/qwen3 --precisions fp16,int4,int2
      dymoe export ./Qwen3-30B-A3B --out bundles/qwen3-trt --target tensorrt
      dymoe export ./Qwen3-30B-A3B --out bundles/qwen3 --quantizer gptq \\
          --calibration-data train.txt
    """
    from dymoe.pipelines import GptqOptions
    from dymoe.pipelines import export as run_export
    from dymoe.toolchain.options import QUANTIZERS, ExportOptions

    if quantizer not in QUANTIZERS:
        raise InputError(f"unknown quantizer {quantizer!r}", f"choose from {', '.join(QUANTIZERS)}")
    if quantizer != "gptq" and calibration_data:
        raise InputError("--calibration-data is only used by --quantizer gptq", "drop it, or add --quantizer gptq")
    t0 = time.perf_counter()
    gptq = GptqOptions(tuple(str(p) for p in calibration_data or ()), gptq_min_tokens,
                       inputs_per_expert) if quantizer == "gptq" else None
    try:
        with reporter(err) as progress:
            opts = ExportOptions(precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                                 block_size=block_size, workers=workers, force=force, progress=progress,
                                 quantizer="hqq" if gptq else quantizer, target=target,
                                 backbone_precision=backbone_precision)
            manifest = run_export(model, out, opts, gptq)
    except KeyboardInterrupt:
        raise DymoeError(f"export to {out} interrupted; finished files are kept",
                         "rerun the same command to resume") from None
    total = sum(f.bytes for f in manifest.files.values())
    err.print(f"wrote {out} ({_mib(total)}, {len(manifest.files)} files) in {time.perf_counter() - t0:.1f} s")


@command()
@friendly
def requantize(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (needs fp16 or fp32 experts to read weights from).")],
    quantizer: Annotated[str, typer.Option(help="rtn, hqq or gptq (gptq needs dymoe calibrate --collect-inputs first).")
                         ] = export_defaults.QUANTIZER,
    precisions: Annotated[str, typer.Option(
        help="Integer precisions to rewrite or add, comma list; empty = every integer precision of the bundle.")] = "",
    gptq_min_tokens: Annotated[int, typer.Option(
        help="gptq: experts routed fewer calibration tokens fall back to hqq (recorded in the manifest).")
    ] = export_defaults.GPTQ_MIN_TOKENS,
) -> None:
    """Rewrite a bundle's low-bit experts with another quantizer.

    The bundle stays usable throughout (manifest.json switches in one atomic write); an
    interrupted run resumes when rerun.

    Examples:
      dymoe calibrate bundles/qwen3 --data train.txt --collect-inputs
      dymoe requantize bundles/qwen3 --quantizer gptq
      dymoe requantize bundles/qwen3 --quantizer hqq --precisions int4,int2
    """
    from dymoe.toolchain.options import QUANTIZERS
    from dymoe.toolchain.quantizers import QuantizerOptions
    from dymoe.toolchain.requantize import RequantizeOptions
    from dymoe.toolchain.requantize import requantize as run_requantize

    if quantizer not in QUANTIZERS:
        raise InputError(f"unknown quantizer {quantizer!r}", f"choose from {', '.join(QUANTIZERS)}")
    if gptq_min_tokens < 1:
        raise InputError(f"--gptq-min-tokens {gptq_min_tokens} must be at least 1",
                         f"for example --gptq-min-tokens {export_defaults.GPTQ_MIN_TOKENS}")
    t0 = time.perf_counter()
    try:
        with reporter(err) as progress:
            opts = RequantizeOptions(quantizer=QuantizerOptions(quantizer, min_tokens=gptq_min_tokens),
                                     precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                                     progress=progress)
            m = run_requantize(bundle, opts)
    except KeyboardInterrupt:
        raise DymoeError(f"requantize of {bundle} interrupted; the bundle is unchanged and finished files are kept",
                         "rerun the same command to resume") from None
    info(bundle)
    if m.calibration:
        err.print("note: the calibration's sensitivity numbers were measured on the previous variants; "
                  "rerun dymoe calibrate to re-measure them")
    err.print(f"requantized {bundle} with {quantizer} in {time.perf_counter() - t0:.1f} s")


@command()
@friendly
def upgrade(bundle: Annotated[Path, typer.Argument(help="Bundle folder written by an older dymoe.")]) -> None:
    """Bring a bundle written by an older dymoe to the current format.

    In place: schema 1 and 2 layer graphs are rebuilt from the weights inside them, a schema 3
    bundle only gets a new manifest.json; the experts are kept as they are. Safe to interrupt
    (rerun to finish); a current bundle is left alone.

    Example:
      dymoe upgrade ~/.cache/dymoe/demo/bundle-0123abcd
    """
    from dymoe.toolchain.upgrade import upgrade as run_upgrade

    t0 = time.perf_counter()
    with reporter(err) as progress:
        m = run_upgrade(bundle, progress)
    err.print(f"{bundle} is a schema {m.schema_version} bundle ({m.model.model_type}, "
              f"{len(m.experts)} experts kept) after {time.perf_counter() - t0:.1f} s")


@command()
@friendly
def info(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    plan: Annotated[bool, typer.Option(
        "--plan", help="What fits in a device's memory: backbone, KV cache, reserve, experts per precision, and "
                       "the bytes a token reads from storage.")] = False,
    memory: Annotated[str | None, typer.Option(
        help="With --plan: memory dymoe may use, with a unit: 16GB (10^9 bytes) or 16GiB (2^30). Default: the "
             "--target profile's usable memory.")] = None,
    context: Annotated[int | None, typer.Option(
        help="With --plan: tokens of KV cache to reserve (default 4096, at most the model's context).")] = None,
    target: TargetOption = None,
) -> None:
    """Summarise a bundle; with --plan, how a device's memory would be split.

    Architecture, layers, experts, sizes and errors per precision.

    Examples:
      dymoe info bundles/qwen3
      dymoe info bundles/qwen3 --plan --memory 16GB --context 8192
      dymoe info bundles/qwen3 --plan --target orin-nx-16gb
    """
    from dymoe.bundle.manifest import read_manifest

    if not plan and (memory is not None or context is not None or target is not None):
        raise InputError("--memory, --context and --target describe a plan", "add --plan, or drop them")
    if plan:
        if memory is None and target is None:
            raise InputError("--plan needs the device's memory", "add --memory 16GB (or 16GiB), or --target PROFILE")
        _print_plan(bundle, memory, context, target)
        return
    m = read_manifest(bundle)
    s, arch = m.model, m.architecture
    dense = s.num_layers - len(s.moe_layers)
    routing = arch.get("routing", {}) if isinstance(arch.get("routing"), dict) else {}
    shared = arch.get("shared_intermediate_size")
    facts = Table(show_header=False, box=None)
    for k, v in [
        ("architecture", s.model_type), ("source", m.source.model),
        ("layers", f"{s.num_layers}" + (f" ({dense} dense, {len(s.moe_layers)} MoE)" if dense else "")),
        ("experts", f"{s.num_experts} per MoE layer, top-{s.top_k}"
         + (f", shared expert ({shared})" if shared else "")),
        ("routing", _describe_routing(routing)),
        ("attention", _describe_attention(arch.get("attention"))),
        ("hidden / expert intermediate", f"{s.hidden_size} / {s.expert_intermediate_size}"),
        ("KV cache per token", f"{s.kv_bytes_per_token() / 1024:,.1f} KiB ("
         + ", ".join(f"{c.name} {c.heads}x{c.dim}" for c in s.kv_cache) + " per layer)"),
        ("context", s.max_position_embeddings), ("vocabulary", s.vocab_size),
        ("quantization", f"{m.quantization.method}, block {m.quantization.block_size}"),
        ("source weights", _mib(m.source.source_bytes)),
    ]:
        facts.add_row(f"[bold]{k}[/]", str(v))
    out.print(facts)
    table = Table(title="per precision")
    for col in ("precision", "format", "quantizer", "experts on disk", "mean weight err", "mean output err",
                "mean routed output err"):
        table.add_column(col, justify="left" if col == "quantizer" else "right")
    for p in m.quantization.precisions:
        vs = [e.variants[p] for e in m.experts]
        size = sum(m.files[v.path].bytes for v in vs)
        routed = [v.routed_output_rel_error for v in vs if v.routed_output_rel_error is not None]
        made = sorted({v.quantizer for v in vs if v.quantizer})
        fell = sum(v.quantizer_note is not None for v in vs)
        table.add_row(p, m.quantization.formats[p], ",".join(made) + (f" ({fell} fell back)" if fell else "") or "-",
                      _mib(size), f"{sum(v.weight_rel_error for v in vs) / len(vs):.4f}",
                      f"{sum(v.output_rel_error for v in vs) / len(vs):.4f}",
                      f"{sum(routed) / len(routed):.4f}" if routed else "-")
    out.print(table)
    out.print(f"backbone: {_describe_backbone(m)}")


def _describe_backbone(m) -> str:
    from dymoe.runtime.device_memory import backbone_bytes

    bb = m.backbone
    disk = sum(m.files[r].bytes + sum(m.files[d].bytes for d in bb.external_data.get(r, ())) for r in bb.graphs())
    how = f"{bb.precision} layers, {bb.embedding} embedding, {bb.lm_head} LM head"
    if bb.quantizer:
        how += f" ({bb.quantizer}, blocks of {m.quantization.block_size})"
    ext = f"; {len(bb.external_data)} graph(s) keep large tensors in external data" if bb.external_data else ""
    return f"{how}; {_mib(disk)} on disk, about {_mib(backbone_bytes(m))} resident{ext}"


def _print_plan(bundle: Path, memory: str | None, context: int | None, target: str | None) -> None:
    from dymoe.bundle.manifest import read_manifest
    from dymoe.plan_table import print_plan
    from dymoe.runtime.plan import facts_of, make_plan, parse_memory

    size = parse_memory(memory) if memory is not None else None  # a bad size fails before anything is read
    m = read_manifest(bundle)
    costs, profile = None, None
    if target is not None:
        from dymoe.runtime.device_memory import device_costs
        from dymoe.runtime.execution import execution_target

        t = execution_target("cuda", target, check=False)  # GPU costs of the profile's engines; nothing runs
        profile, costs = t.profile, device_costs(m, t)
    p = make_plan(facts_of(m, costs), size if size is not None else profile.usable_bytes, context,
                  storage_mb_per_s=profile.storage.read_mb_per_s if profile else None)
    print_plan(p, str(bundle), memory, profile, out)
    if not p.fits:
        err.print(f"[yellow]warning:[/] the expert budget does not hold one layer's top-{p.facts.top_k} at any "
                  "precision: a run would be refused")


_ROUTING_DEFAULTS = {"norm_topk_prob": False, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                     "routed_scaling_factor": 1.0}


def _describe_routing(r: dict) -> str:
    extra = [f"{k} {v}" for k, v in r.items() if k in _ROUTING_DEFAULTS and v != _ROUTING_DEFAULTS[k]]
    return ", ".join([str(r.get("kind", "-")), *extra])


def _describe_attention(a) -> str:
    if not isinstance(a, dict):
        return "-"
    if "kv_lora_rank" in a:
        q = f", q rank {a['q_lora_rank']}" if a.get("q_lora_rank") else ""
        return f"MLA, {a.get('num_heads')} heads, latent {a['kv_lora_rank']} + rope {a.get('qk_rope_head_dim')}{q}"
    return f"{a.get('num_heads')} heads, {a.get('num_kv_heads')} kv heads, head_dim {a.get('head_dim')}"


# Options shared by run and serve: how the experts are held (declared once, used by both)
PrecisionOpt = Annotated[str | None, typer.Option(
    help="Every expert resident at this precision (default: the bundle's highest). Not with --policy.")]
PolicyOpt = Annotated[str | None, typer.Option(
    help="Budgeted policy: ondemand, lru, lru-prefetch, static-int4, static-int2, dymoe.")]
# what a budget may be, said once: a share is of the measured resident cost, not of the files on disk
BUDGET_FORMS = ("a size (600MiB, 1.5GB) or a share (25%) of what every expert costs resident at full precision, "
                "as measured on this machine")
BudgetOpt = Annotated[str | None, typer.Option(
    help=f"With --policy: memory for resident experts, {BUDGET_FORMS}. [default: {run_defaults.BUDGET}]",
    show_default=False)]
PolicyConfigOpt = Annotated[Path | None, typer.Option(help="TOML file with policy settings.")]
LadderOpt = Annotated[str | None, typer.Option(help="Precision ladder, e.g. 4/2, 4/0, 8/4/2, fp16/4/0.")]
RetentionOpt = Annotated[float | None, typer.Option(help="r: share of selected experts kept at the top step.")]
ScheduleOpt = Annotated[str | None, typer.Option(help="Depth schedule of r: constant, cosine, calibrated.")]
EvictionOpt = Annotated[str | None, typer.Option(
    help="lru; priority (frequency + calibration priors); or reuse (longest expected reuse distance first).")]
PrefetchOpt = Annotated[int | None, typer.Option(help="Look-ahead depth in layers (0, 1, 2).")]
RenormalizeOpt = Annotated[bool | None, typer.Option(
    "--renormalize/--no-renormalize", help="Rescale kept experts' weights when some are skipped.")]
ServeLowerOpt = Annotated[bool | None, typer.Option(
    "--serve-lower-while-promoting/--wait-for-promotion",
    help="Use a resident lower-precision copy while the higher one loads.")]
OnLoadErrorOpt = Annotated[str | None, typer.Option(help="error, or fallback to another precision.")]
IoOpt = Annotated[str, typer.Option(help="cached, or direct (every load reads storage, not the page cache).")]
StorageProfileOpt = Annotated[str | None, typer.Option(
    help="Emulate a device's storage: orin-nano-nvme, orin-emmc, microsd, or a .toml file.")]
EngineCacheOpt = Annotated[str, typer.Option(
    help="Where ORT-optimised expert graphs are kept between loads: auto (user cache), a folder, or off.")]


def _policy_plan(precision: str | None, policy: str | None, budget: str | None, policy_config: Path | None,
                 overrides: dict, io: str, storage_profile: str | None, engine_cache: str, target=None):
    """The budgeted run the options ask for, or None for every expert resident at one precision.
    A policy setting without --policy (--budget, --ladder, ...) means the dymoe policy: an option
    given is never ignored."""
    from dymoe.runtime.policy_config import PolicyRun

    implied = [name for name, v in (("--budget", budget), ("--policy-config", policy_config),
                                    *((f"--{k.replace('_', '-')}", v) for k, v in overrides.items())) if v is not None]
    if precision is not None and (policy is not None or implied):
        given = "--policy" if policy is not None else implied[0]
        raise DymoeError(f"--precision and {given} exclude each other: --precision keeps every expert resident",
                         "use --policy static-int4 --budget 25% (budgeted), or --precision int4 alone (all resident)")
    if policy is None and implied:
        policy = "dymoe"
    if policy is not None:
        from dymoe.runtime.budget import parse_budget

        parse_budget(budget or run_defaults.BUDGET, 1)  # its form now, before any slow step
    return None if policy is None else PolicyRun(
        policy, budget or run_defaults.BUDGET, policy_config=policy_config, io=io, storage_profile=storage_profile,
        engine_cache=None if engine_cache == "off" else engine_cache, overrides=overrides,
        on_note=lambda note: err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False), target=target)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    from dymoe.bundle.fsutil import read_user_text

    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of them", param_hint="'--prompt' / '--prompt-file'")
    if prompt is not None:
        return prompt
    text = sys.stdin.read() if str(prompt_file) == "-" else read_user_text(prompt_file, "--prompt-file")
    # an editor ends a file with a newline the user did not mean as part of the prompt
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


@command()
@friendly
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", "-f", help="Read the prompt from this UTF-8 file (- for standard input); one final "
                                    "newline is dropped.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Tokens to generate at most.")] = run_defaults.MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    precision: PrecisionOpt = None,
    policy: PolicyOpt = None,
    budget: BudgetOpt = None,
    policy_config: PolicyConfigOpt = None,
    ladder: LadderOpt = None,
    retention: RetentionOpt = None,
    schedule: ScheduleOpt = None,
    eviction: EvictionOpt = None,
    prefetch: PrefetchOpt = None,
    renormalize: RenormalizeOpt = None,
    serve_lower: ServeLowerOpt = None,
    on_load_error: OnLoadErrorOpt = None,
    io: IoOpt = run_defaults.IO,
    storage_profile: StorageProfileOpt = None,
    engine_cache: EngineCacheOpt = run_defaults.ENGINE_CACHE,
    metrics_json: Annotated[Path | None, typer.Option(help="Write timings, counters, prompt and token ids here.")]
    = None,
    device: DeviceOption = device_defaults.DEVICE,
    target: TargetOption = None,
    engines: EnginesOption = None,
) -> None:
    """Generate text from a bundle, streaming it to the terminal.

    Without --policy every expert is resident at one precision. With --policy, experts load
    from storage into a cache bounded by --budget, at the precisions the policy chooses.

    Examples:
      dymoe run bundles/q3 --prompt "The capital of France is" --max-new-tokens 32
      dymoe run bundles/q3 --prompt-file long_prompt.txt --max-new-tokens 128
      dymoe run bundles/q3 -p "Once" --policy dymoe --budget 25% --io direct
      dymoe run bundles/q3 -p "Once" --policy lru --budget 600MiB
      dymoe run bundles/q3 -p "Once" --ladder 8/4/2 --retention 0.75
      dymoe run bundles/q3-trt -p "Once" --device tensorrt --target orin-nano-8gb
    """
    from dymoe.bundle.fsutil import check_output_file
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.sampling import SamplingParams

    text = _read_prompt(prompt, prompt_file)
    if metrics_json:
        check_output_file(metrics_json, "--metrics-json")
    overrides = dict(ladder=ladder, retention=retention, schedule=schedule, eviction=eviction, prefetch=prefetch,
                     renormalize=renormalize, serve_lower_while_promoting=serve_lower, on_load_error=on_load_error)
    sampling = SamplingParams(temperature, top_p, seed)  # checked before the bundle is opened
    where = _target(device, target, engines)
    plan = _policy_plan(precision, policy, budget, policy_config, overrides, io, storage_profile, engine_cache,
                        where)
    with reporter(err) as progress:
        session = open_model(bundle, precision=precision, progress=progress, policy=plan, target=where)
    try:
        result = session.generate(text, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, seed=sampling.seed,
                                  stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        metrics = session.metrics(result)
    finally:
        session.close()
    _print_run_summary(metrics)
    if metrics_json:
        from dymoe.bundle.fsutil import atomic_write_text

        atomic_write_text(metrics_json, json.dumps(metrics, indent=1) + "\n")


@command()
@friendly
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    host: Annotated[str, typer.Option(
        help="Address to listen on: 127.0.0.1 is this device only; 0.0.0.0 every interface (set an API key).")]
    = serve_defaults.HOST,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port, printed at start).")] = serve_defaults.PORT,
    api_key: Annotated[str | None, typer.Option(
        envvar=serve_defaults.API_KEY_ENV, show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on every request (the environment variable keeps the key "
             "out of the process list).")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="The model id clients pass as 'model' (default: the bundle folder's name).")] = None,
    chat_template: Annotated[Path | None, typer.Option(
        help="A Jinja chat template file to use instead of the bundle's.")] = None,
    queue_size: Annotated[int, typer.Option(
        help="Requests that may wait while one generates; more are answered 429 at once.")]
    = serve_defaults.QUEUE_SIZE,
    max_tokens: Annotated[int, typer.Option(
        help="Most tokens one request may generate (and the default when it names none).")]
    = serve_defaults.MAX_TOKENS,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        help="Longest prompt in tokens (default: the model's context less one).", show_default=False)] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger ones are answered 413.")]
    = serve_defaults.MAX_BODY_BYTES,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM, seconds that running and queued requests may take to finish.")]
    = serve_defaults.DRAIN_TIMEOUT_S,
    body_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its request body.")]
    = serve_defaults.BODY_TIMEOUT_S,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more are answered 503.")]
    = serve_defaults.MAX_CONNECTIONS,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log one line per request.")]
    = True,
    precision: PrecisionOpt = None,
    policy: PolicyOpt = None,
    budget: BudgetOpt = None,
    policy_config: PolicyConfigOpt = None,
    ladder: LadderOpt = None,
    retention: RetentionOpt = None,
    schedule: ScheduleOpt = None,
    eviction: EvictionOpt = None,
    prefetch: PrefetchOpt = None,
    renormalize: RenormalizeOpt = None,
    serve_lower: ServeLowerOpt = None,
    on_load_error: OnLoadErrorOpt = None,
    io: IoOpt = run_defaults.IO,
    storage_profile: StorageProfileOpt = None,
    engine_cache: EngineCacheOpt = run_defaults.ENGINE_CACHE,
) -> None:
    """Serve a bundle over HTTP with OpenAI's API.

    POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, /health
    (503 while loading) and /metrics (Prometheus). One generation runs at a time; --queue-size
    more wait, and further requests get 429 at once.

    SIGTERM (or Ctrl-C) stops accepting connections, lets running and queued requests finish
    (up to --drain-timeout), and exits. Needs dymoe's "serve" extra (uvicorn, jinja2).

    Examples:
      dymoe serve bundles/q3
      dymoe serve bundles/q3 --policy dymoe --budget 25% --port 8080
      DYMOE_API_KEY=secret dymoe serve bundles/q3 --host 0.0.0.0
      curl -s localhost:8000/v1/completions -d '{"prompt": "Once"}'
    """
    from dymoe.serve.options import ServeOptions
    from dymoe.serve.server import serve as run_server

    overrides = dict(ladder=ladder, retention=retention, schedule=schedule, eviction=eviction, prefetch=prefetch,
                     renormalize=renormalize, serve_lower_while_promoting=serve_lower, on_load_error=on_load_error)
    plan = _policy_plan(precision, policy, budget, policy_config, overrides, io, storage_profile, engine_cache)
    opts = ServeOptions(host=host, port=port, model_name=model_name, api_key=api_key or None,
                        queue_size=queue_size, max_body_bytes=max_body_bytes, max_tokens=max_tokens,
                        max_prompt_tokens=max_prompt_tokens, body_timeout_s=body_timeout,
                        drain_timeout_s=drain_timeout, max_connections=max_connections, chat_template=chat_template,
                        precision=precision, policy=plan, log_level=log_level, access_log=access_log)
    run_server(bundle, opts, say=lambda line: err.print(line, highlight=False, markup=False))


def _print_run_summary(m: dict) -> None:
    line = (f"{m['new_tokens']} tokens | TTFT {m['ttft_s'] * 1e3:.1f} ms | TPOT {m['tpot_s'] * 1e3:.1f} ms "
            f"(p50 {m['tpot_p50_s'] * 1e3:.1f}, p90 {m['tpot_p90_s'] * 1e3:.1f}) | experts {m['experts']} | "
            f"backbone {_mib(m['backbone_file_bytes'])} | peak RSS {_mib(m['peak_rss_bytes'])} | "
            f"stop: {m['stop_reason']}")
    err.print(f"[dim]{line}[/]", highlight=False)
    if "policy" in m:
        pp, pr = m["prefetch_precision"], m["prefetch_recall"]
        err.print(
            f"[dim]budget {_mib(m['budget_bytes'])} (peak resident {_mib(m['peak_resident_bytes'])}) | "
            f"stall/token {m['stall_per_token_s'] * 1e3:.1f} ms | read/token {_mib(m['bytes_read_per_token'])} | "
            f"hit rate {m['hit_rate']:.2f} | prefetch P/R "
            f"{'-' if pp is None else f'{pp:.2f}'}/{'-' if pr is None else f'{pr:.2f}'} | "
            f"loads {m['loads']} (read {m['load_read_s']:.2f} s, engine {m['load_create_s']:.2f} s) | "
            f"{m['storage']}[/]", highlight=False)
        slow, reads = m.get("storage_slower_than_profile", 0), m.get("storage_reads", 0)
        if m.get("emulated_storage") and reads and slow * 2 > reads:
            err.print(f"note: {slow} of {reads} reads took longer on this machine's storage than the emulated "
                      "profile allows; emulation only slows reads down, so those ran at this machine's speed",
                      highlight=False)


@command()
@friendly
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    policies: Annotated[str, typer.Option(help="Comma list of policies to compare.")] = run_defaults.BENCH_POLICIES,
    budget: Annotated[str, typer.Option(help=f"Expert memory budget: {BUDGET_FORMS}.")]
    = run_defaults.BENCH_BUDGET,
    sweep_budget: Annotated[str | None, typer.Option(help="Comma list of budgets to repeat the comparison at.")]
    = None,
    io: Annotated[str, typer.Option(help="cached, or direct (loads read storage).")] = "cached",
    storage_profile: Annotated[str | None, typer.Option(help="Emulated device storage profile.")] = None,
    full_precision: Annotated[str | None, typer.Option(help="What baselines load (default: the bundle's highest).")]
    = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts: one per line, or JSON Lines with 'prompt'.")] = None,
    prompt_tokens: Annotated[int | None, typer.Option(min=1, help="Cut or repeat each prompt to this length.")]
    = None,
    new_tokens: Annotated[int, typer.Option(
        min=1, help="Tokens generated per run.")] = run_defaults.BENCH_NEW_TOKENS,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds over all prompts and policies.")] = 3,
    accuracy: Annotated[bool, typer.Option("--accuracy/--no-accuracy", help="Measure perplexity per policy.")]
    = True,
    data: Annotated[Path | None, typer.Option(help="Held-out text for perplexity (default: the demo's).")] = None,
    windows: Annotated[int, typer.Option(min=1, help="Perplexity windows (of --window tokens).")] = 4,
    window: Annotated[int, typer.Option(min=2, help="Perplexity window length.")] = 128,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Folder for PNG plots.")] = None,
    device: DeviceOption = device_defaults.DEVICE,
    target: TargetOption = None,
    engines: EnginesOption = None,
) -> None:
    """Compare budgeted policies side by side: speed beside accuracy.

    TTFT, TPOT, stall, bytes read, hit rate, prefetch recall and peak RSS, with a cold cache
    (first prompt) and a warm one (the next prompt); held-out perplexity and top-1 agreement
    with the reference (fp32 when the bundle has it, else its highest precision). Runs are
    interleaved (A B C A B C ...) after a warm-up, each with a fresh cache; medians.

    Examples:
      dymoe bench B --policies ondemand,lru,lru-prefetch,static-int4,dymoe \\
          --budget 25% --io direct
      dymoe bench B --sweep-budget 15%,25%,50%,100% --plot results/
      dymoe bench B --device cuda --target orin-nano-8gb --policies lru,dymoe
    """
    from dymoe.bundle.fsutil import check_output_dir, check_output_file
    from dymoe.runtime.bench import BenchOptions, read_prompts, run_bench
    from dymoe.runtime.bench_plots import write_plots
    from dymoe.runtime.policy_config import PolicyRun
    from dymoe.tables import print_tables

    if json_out:
        check_output_file(json_out, "--json")
    if plot:
        check_output_dir(plot, "--plot")

    if accuracy and data is None:
        data = _demo_heldout_if_demo(bundle)
    opts = BenchOptions(
        policies=[p.strip() for p in policies.split(",") if p.strip()],
        budgets=[b.strip() for b in (sweep_budget or budget).split(",") if b.strip()],
        base=PolicyRun("lru", io=io, storage_profile=storage_profile, full_precision=full_precision,
                       target=_target(device, target, engines)),
        prompts=read_prompts(prompts) if prompts else None, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        repeats=repeats, accuracy=accuracy, data=data, window=window, windows=windows)
    with reporter(err) as progress:
        result = run_bench(bundle, opts, progress)
    print_tables(result, out)
    if json_out:
        from dymoe.bundle.fsutil import atomic_write_text

        atomic_write_text(json_out, json.dumps(result, indent=1) + "\n")
        err.print(f"wrote {json_out}")
    if plot:
        for path in write_plots(result, plot):
            err.print(f"wrote {path}")


@command("eval")
@friendly
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    data: Annotated[Path | None, typer.Option(help="Held-out text (default: the demo model's).")] = None,
    policy: Annotated[str | None, typer.Option(help="Evaluate under this budgeted policy.")] = None,
    budget: BudgetOpt = None,
    precision: Annotated[str | None, typer.Option(help="All experts at this precision (default: highest).")]
    = None,
    window: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 128,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Score at most this many windows.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    device: DeviceOption = device_defaults.DEVICE,
    target: TargetOption = None,
    engines: EnginesOption = None,
) -> None:
    """Held-out perplexity, and top-1 agreement with the reference.

    The reference is every expert at fp32 when the bundle has it, else at its highest
    precision. With --policy the text is fed token by token, so the policy decides as it does
    while generating: slow on long text (use --max-windows).

    Examples:
      dymoe eval B --data heldout.txt
      dymoe eval B --policy dymoe --budget 25% --max-windows 4
      dymoe eval B --precision int4 --device tensorrt --target orin-nano-8gb
    """
    from dymoe.bundle.fsutil import check_output_file, read_user_text
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.evaluate import evaluate, windows
    from dymoe.runtime.tokenizer import TextTokenizer

    if json_out:
        check_output_file(json_out, "--json")
    where = _target(device, target, engines)
    plan = _policy_plan(precision, policy, budget, None, {}, run_defaults.IO, None, run_defaults.ENGINE_CACHE, where)
    if data is None:
        data = _demo_heldout_if_demo(bundle)
        if data is None:
            raise InputError("no --data given and this bundle is not the demo model's", "pass --data FILE")
    text = read_user_text(data, "--data")
    ids = TextTokenizer(Bundle(bundle).tokenizer_path()).encode(text)
    if plan is not None:  # one decode step per token: minutes on a long text, so say so before starting
        scored = sum(len(w) - 1 for w in windows(ids, window, max_windows))
        err.print(f"note: under --policy {plan.policy} the text is fed token by token: {scored:,} decode steps"
                  + ("" if max_windows else "; --max-windows N scores only the first N windows"), highlight=False)
    with reporter(err) as progress:
        result = evaluate(bundle, ids, precision=precision, target=where, policy=plan,
                          window=window, max_windows=max_windows, progress=progress)
    r = result.run
    report = {"bundle": str(bundle), "data": str(data), "experts": result.label, "perplexity": r.ppl,
              "nll": r.nll, "tokens": r.tokens, "windows": r.windows}
    if result.reference is not None:
        report.update(reference_perplexity=result.reference.ppl, top1_agreement=result.top1_agreement)
    out.print(f"perplexity {r.ppl:.4f} over {r.tokens} tokens ({r.windows} windows, {result.label})"
              + (f"; reference ({result.reference_label}) {result.reference.ppl:.4f}, top-1 agreement "
                 f"{result.top1_agreement:.3f}" if result.reference is not None else ""))
    if json_out:
        from dymoe.bundle.fsutil import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=1) + "\n")


@command()
@friendly
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    target: Annotated[str | None, typer.Option(
        "--target", help="Device profile whose TensorRT version and ONNX Runtime capabilities apply "
                         "(orin-nano-8gb, orin-nx-16gb, agx-orin-64gb or a .toml); default: current releases.")]
    = None,
    every: Annotated[bool, typer.Option("--all", help="Read every expert graph, not one per MoE layer.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the verdicts here.")] = None,
) -> None:
    """Which execution provider can run each precision of a bundle, and why.

    The expert graphs are read and checked against TensorRT's INT4 rules and what ONNX
    Runtime's CUDA provider runs (TensorRT, ONNX Runtime CUDA, CPU). Needs no GPU.

    Example:
      dymoe check bundles/qwen3-trt --target orin-nano-8gb
    """
    from dymoe.bundle.fsutil import check_output_file
    from dymoe.check_table import print_check
    from dymoe.runtime.check import check_bundle, report_json
    from dymoe.targets.devices import load_device

    if json_out:
        check_output_file(json_out, "--json")
    profile = load_device(target) if target else None
    with reporter(err) as progress:
        checks = check_bundle(bundle, profile, every, progress)
    print_check(checks, f"{bundle}: " + (profile.describe() if profile else "current TensorRT and onnxruntime-gpu"),
                out)
    if json_out:
        from dymoe.bundle.fsutil import atomic_write_text

        atomic_write_text(json_out, json.dumps(report_json(checks, profile), indent=1) + "\n")


@command("build-engines")
@friendly
def build_engines(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (best exported with --target tensorrt).")],
    target: Annotated[str, typer.Option(
        "--target", help="Device profile: orin-nano-8gb, orin-nx-16gb, agx-orin-64gb or a .toml (token range, "
                         "compute capability).")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Engine folder (default: the user cache, per profile); give it to run with --engines.")] = None,
    precisions: Annotated[str, typer.Option(
        help="Comma list of precisions to build; empty = every precision in a form TensorRT runs.")] = "",
    optimization_level: Annotated[int, typer.Option(
        min=0, max=5, help="TensorRT builder optimisation level (higher: longer builds, maybe faster engines).")
    ] = run_defaults.TRT_OPTIMIZATION_LEVEL,
) -> None:
    """Build TensorRT engines for a bundle's experts, on the device.

    One engine for every expert graph TensorRT runs (needs the tensorrt Python package), into
    a checksummed engine folder with a shared timing cache. Interrupted builds resume when
    rerun; dymoe run --device tensorrt --engines DIR loads them.

    Example:
      dymoe build-engines bundles/qwen3-trt --target orin-nano-8gb
    """
    from dymoe.bundle.manifest import read_manifest
    from dymoe.runtime.trt_build import TensorRTBuilder, plan, read_timing_cache
    from dymoe.runtime.trt_build import build_engines as run_build
    from dymoe.runtime.trt_engines import default_dir
    from dymoe.targets.devices import load_device

    profile = load_device(target)
    wanted = tuple(p.strip() for p in precisions.split(",") if p.strip())
    plan(read_manifest(bundle), wanted)  # the bundle's own problems first, even where tensorrt is missing
    folder = out_dir or default_dir(profile.name)
    builder = TensorRTBuilder(read_timing_cache(folder))
    try:
        with reporter(err) as progress:
            report = run_build(bundle, folder, profile, builder, wanted, optimization_level, progress=progress)
    except KeyboardInterrupt:
        raise DymoeError(f"build-engines into {folder} interrupted; finished engines are kept",
                         "rerun the same command to resume") from None
    err.print(f"{report.built} engines built, {report.skipped} already there, in {report.seconds:.1f} s; "
              f"{_mib(report.engine_bytes)} of engines in {folder}")
    err.print(f"run with: dymoe run {bundle} --device tensorrt --target {target} --engines {folder}")


def _demo_heldout_if_demo(bundle: Path) -> Path | None:
    """The shipped demo model's held-out text, when ``bundle`` was exported from it."""
    try:
        from dymoe.demo import demo_heldout_for
    except ImportError:
        return None
    return demo_heldout_for(bundle)


@command()
@friendly
def demo(
    model: Annotated[Path | None, typer.Option(help="Run the demo on another checkpoint folder instead.")] = None,
    budget: Annotated[str, typer.Option(help="Expert memory budget for the demo.")] = DEMO_BUDGET,
    widen: Annotated[int | None, typer.Option(
        min=2, metavar="K", help="Run on the shipped model widened K times (experts K times larger, same function "
                                 "and routing), built once: a more realistic expert size, e.g. --widen 8.")] = None,
) -> None:
    """The main job on the model that ships with dymoe: LRU vs DyMoE.

    Exports the shipped demo model (once; cached), generates under a memory budget that forces
    offloading, then compares LRU offloading with DyMoE at that budget over several runs and
    says what the numbers mean. No download needed; about a minute on 2 cores.

    Examples:
      dymoe demo
      dymoe demo --widen 8
    """
    from dymoe.demo import run_demo

    run_demo(out, err, model=model, budget=budget, progress_scope=lambda: reporter(err), widen=widen)


@command()
@friendly
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    more: Annotated[list[Path] | None, typer.Argument(
        metavar="PATH", show_default=False, help="More data paths, as after --data.")] = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", metavar="PATH [PATH...]", show_default=False,
        help="Plain text, JSON Lines (field 'text') or a folder of them; several may follow --data.")] = None,
    samples: Annotated[int, typer.Option(
        min=1, help="Token windows drawn from the data (importance, predictability).")] = cal_defaults.SAMPLES,
    sensitivity_samples: Annotated[int, typer.Option(
        min=1, help="Of those, windows rerun per sensitivity variant.")] = cal_defaults.SENSITIVITY_SAMPLES,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per window (one prefill each).")] = cal_defaults.SEQ_LEN,
    seed: Annotated[int, typer.Option(help="Chooses the windows.")] = cal_defaults.SEED,
    target_kl: Annotated[float, typer.Option(
        min=0.0, help="Mean-KL budget (nats) for the recommended retention r(l).")] = cal_defaults.TARGET_KL,
    report: Annotated[Path | None, typer.Option(
        help=f"Report folder (default: BUNDLE/{REPORT_DIRNAME}).", show_default=False)] = None,
    report_only: Annotated[bool, typer.Option(
        "--report-only", help="Rebuild the report from the bundle's calibration.json; measure nothing.")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write calibration.json only.")] = False,
    no_sensitivity: Annotated[bool, typer.Option(
        "--no-sensitivity", help="Importance and predictability only (one pass).")] = False,
    collect_inputs: Annotated[bool, typer.Option(
        help=f"Also keep each expert's routed hidden states (BUNDLE/{INPUTS_DIRNAME}/), for "
             "`dymoe requantize --quantizer gptq`; memory and disk: about layers x experts x N x hidden x 2 bytes.")
    ] = False,
    inputs_per_expert: Annotated[int, typer.Option(
        metavar="N", help="With --collect-inputs: routed hidden states kept per expert (N), a uniform sample "
                          "of all it received.")] = cal_defaults.INPUTS_PER_EXPERT,
) -> None:
    """Measure a bundle's experts on sample text (calibration.json + report).

    Expert importance, depth sensitivity and routing predictability; calibration.json goes
    into the bundle (listed in its manifest) and a report with plots into --report.

    Examples:
      dymoe calibrate B --data heldout.txt --samples 64
      dymoe calibrate B --data train.txt --collect-inputs --no-sensitivity
    """
    from rich import box

    from dymoe.calibration import report as cal_report
    from dymoe.calibration.options import CalibrationOptions

    folder = report or bundle / REPORT_DIRNAME
    if report_only:
        from dymoe.bundle.calibration import read_calibration
        from dymoe.bundle.manifest import read_manifest

        manifest = read_manifest(bundle)
        cal_report.check_report_folder(folder)
        written = cal_report.write_report(read_calibration(bundle, manifest), folder,
                                          source=str(bundle / (manifest.calibration or "")))
        err.print(f"wrote {len(written)} report files to {folder}")
        return
    from dymoe.calibration.run import calibrate as run_calibration

    paths = [*(data or []), *(more or [])]
    if not no_report:
        cal_report.require_matplotlib()  # fail before measuring, not after
        cal_report.check_report_folder(folder)
    opts = CalibrationOptions(samples=samples, sensitivity_samples=sensitivity_samples, seq_len=seq_len, seed=seed,
                              target_kl=target_kl, sensitivity=not no_sensitivity, collect_inputs=collect_inputs,
                              inputs_per_expert=inputs_per_expert)
    with reporter(err) as progress:
        measured, path = run_calibration(bundle, paths, opts, progress=progress)
    for note in measured.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    header, rows = cal_report.summary(measured.calibration)
    table = Table(title="calibration", box=box.SIMPLE_HEAD)
    for col in header:
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    err.print(f"wrote {path} in {measured.total_s:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in measured.seconds.items())})")
    if inputs := measured.calibration.expert_inputs:
        rows = sum(map(sum, inputs.kept))
        err.print(f"kept {rows:,} routed inputs (at most {inputs.cap} per expert) in {len(inputs.files)} files "
                  f"under {bundle / INPUTS_DIRNAME}: {_mib(sum(map(len, measured.inputs.values())))}")
    if not no_report:
        written = cal_report.write_report(measured.calibration, folder, measured.seconds, str(path))
        err.print(f"wrote {len(written)} report files to {folder}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
