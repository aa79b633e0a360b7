"""``dymoe export``: checkpoint folder -> bundle, resumable and atomic.

Every output file is written atomically and recorded in a journal (``.dymoe-export.jsonl``)
together with its checksum and quantization statistics. ``manifest.json`` is written last, so
a folder without it is never mistaken for a bundle; rerunning the same command after an
interruption skips every file the journal vouches for and finishes the bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import dymoe
from dymoe import defaults
from dymoe.bundle_folder import folder_state, foreign_error, remove_listed, remove_temp_files
from dymoe.calibration.inputs import memory_bound
from dymoe.calibration.options import INPUTS_PER_EXPERT
from dymoe.errors import BundleError, CheckpointError, InputError
from dymoe.fsutil import atomic_write_bytes, require_free_space, sha256_file
from dymoe.journal import Journal
from dymoe.lock import bundle_lock
from dymoe.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Backbone,
    ExpertEntry,
    ExpertVariant,
    FileEntry,
    Manifest,
    ModelSpec,
    Quantization,
    Source,
)
from dymoe.paths import resolve
from dymoe.workers import worker_pool

from . import backbone_graph
from .archs import get_architecture
from .checkpoint import TOKENIZER_FILES, Checkpoint, resolve_model_path
from .expert_graph import BITS, PRECISIONS, build_expert_model, expected_bytes
from .layout import Ref, check_coverage
from .quantizers import FALLBACK, QUANTIZERS, QuantizerOptions, quantize_expert

JOURNAL = ".dymoe-export.jsonl"
FORMATS = {"fp32": "float", "fp16": "float", "int8": "qdq", "int4": "qdq", "int2": "matmulnbits"}


@dataclass(frozen=True)
class ExportOptions:
    precisions: tuple[str, ...] = defaults.PRECISIONS
    block_size: int = defaults.BLOCK_SIZE
    workers: int = defaults.EXPORT_WORKERS
    force: bool = False
    progress: bool = True
    quantizer: str = defaults.QUANTIZER
    # gptq only: text the calibration pass runs (the experts' routed inputs are collected from it)
    calibration_data: tuple[str, ...] = ()
    gptq_min_tokens: int = defaults.GPTQ_MIN_TOKENS
    inputs_per_expert: int = INPUTS_PER_EXPERT  # gptq: routed rows kept per expert

    def validate(self) -> tuple[str, ...]:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise InputError(
                f"unknown precision(s) {', '.join(unknown) or '(none given)'}",
                f"choose from {', '.join(PRECISIONS)}",
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size {self.block_size} must be a power of two >= 16")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers} must be at least 1")
        if self.quantizer not in QUANTIZERS:
            raise InputError(f"unknown quantizer {self.quantizer!r}", f"choose from {', '.join(QUANTIZERS)}")
        if self.quantizer == "gptq" and not self.calibration_data:
            raise InputError(
                "--quantizer gptq needs calibration text: it quantizes each expert with its own routed inputs",
                "pass --calibration-data FILE (text or JSON Lines), or export with --quantizer hqq, then run "
                "dymoe calibrate BUNDLE --data FILE --collect-inputs and dymoe requantize BUNDLE --quantizer gptq")
        if self.quantizer != "gptq" and self.calibration_data:
            raise InputError("--calibration-data is only used by --quantizer gptq",
                             "drop it, or add --quantizer gptq")
        if self.gptq_min_tokens < 1:
            raise InputError(f"--gptq-min-tokens {self.gptq_min_tokens} must be at least 1")
        if self.inputs_per_expert < 1:
            raise InputError(f"--inputs-per-expert {self.inputs_per_expert} must be at least 1")
        if self.quantizer == "gptq":
            if not {"fp32", "fp16"} & set(self.precisions):
                raise InputError("--quantizer gptq needs a float precision in --precisions: the calibration pass "
                                 "runs it, and the integer variants are requantized from it",
                                 "add fp16 (or fp32), e.g. --precisions fp16,int4,int2")
            if not set(BITS) & set(self.precisions):
                raise InputError("--quantizer gptq has nothing to quantize: no integer precision in --precisions",
                                 "add int8, int4 or int2, e.g. --precisions fp16,int4,int2")
        # highest precision first, duplicates removed
        return tuple(p for p in PRECISIONS if p in self.precisions)


def expert_path(layer: int, expert: int, precision: str) -> str:
    return f"experts/layer_{layer:03d}/expert_{expert:03d}.{precision}.onnx"


def layer_path(layer: int) -> str:
    return f"backbone/layer_{layer:03d}.onnx"


# --- work done per task (in this process or a worker) ------------------------------------

_CKPT: dict[str, Checkpoint] = {}


def _checkpoint(folder: str) -> Checkpoint:
    if folder not in _CKPT:
        _CKPT.clear()
        _CKPT[folder] = Checkpoint(Path(folder))
    return _CKPT[folder]


def _read(ckpt: Checkpoint, ref: Ref):
    return ckpt.read(ref.source, index=ref.index, rows=ref.rows)


def _write_model(out: Path, rel: str, model) -> dict:
    data = model.SerializeToString()
    sha = atomic_write_bytes(resolve(out, rel), data)
    return {"bytes": len(data), "sha256": sha}


def write_expert(out: Path, rel: str, gate, up, down, precision: str, block_size: int, quantizer: QuantizerOptions,
                 name: str, inputs=None) -> dict:
    """Quantize (for an integer precision), build and atomically write one expert variant; return
    its journal entry: file size and sha256, errors, and what quantized it."""
    quant = None
    if precision in BITS:
        quant = quantize_expert(gate, up, down, precision, block_size, quantizer, inputs)
    model, stats = build_expert_model(gate, up, down, precision, block_size, name=name,
                                      quantized=quant.mats if quant else None)
    entry = _write_model(out, rel, model)
    del model
    entry.update(weight_rel_error=float(stats.weight_rel_error), output_rel_error=float(stats.output_rel_error))
    if quant:
        entry.update(quantizer=quant.quantizer, quantizer_note=quant.note, calibration_tokens=quant.tokens,
                     routed_output_rel_error=quant.routed_output_rel_error)
    return entry


def _expert_task(folder: str, out: str, spec: ModelSpec, mapping: dict, layer: int, expert: int,
                 precisions: tuple[str, ...], block_size: int, quantizer: QuantizerOptions) -> dict[str, dict]:
    ckpt = _checkpoint(folder)
    p = f"layers.{layer}.experts.{expert}."
    gate, up, down = (_read(ckpt, mapping[p + n]) for n in ("gate", "up", "down"))
    done = {}
    for prec in precisions:
        rel = expert_path(layer, expert, prec)
        done[rel] = write_expert(Path(out), rel, gate, up, down, prec, block_size, quantizer,
                                 name=f"l{layer}_e{expert}_{prec}")
    return done


def _backbone_task(folder: str, out: str, spec: ModelSpec, mapping: dict, what: str) -> dict[str, dict]:
    ckpt = _checkpoint(folder)
    if what == "embed":
        rel, model = "backbone/embed.onnx", backbone_graph.embed_graph(_read(ckpt, mapping["embed"]))
    elif what == "head":
        lm = mapping["embed"] if spec.tie_word_embeddings else mapping["lm_head"]
        model = backbone_graph.head_graph(spec, _read(ckpt, mapping["final_norm"]), _read(ckpt, lm))
        rel = "backbone/head.onnx"
    else:
        layer = int(what)
        prefix = f"layers.{layer}."
        tensors = {c[len(prefix):]: _read(ckpt, r) for c, r in mapping.items()
                   if c.startswith(prefix) and ".experts." not in c}
        rel, model = layer_path(layer), backbone_graph.layer_graph(spec, tensors, layer)
    return {rel: _write_model(Path(out), rel, model)}


# --- orchestration ------------------------------------------------------------------------


def _fingerprint(ckpt: Checkpoint, precisions: tuple[str, ...], block_size: int, options: ExportOptions) -> str:
    blob = json.dumps(
        {"checkpoint": ckpt.fingerprint(), "precisions": precisions, "block_size": block_size,
         "quantizer": options.quantizer, "calibration_data": [str(Path(p).resolve()) for p in options.calibration_data],
         "gptq_min_tokens": options.gptq_min_tokens, "dymoe": dymoe.__version__, "schema": SCHEMA_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out(out: Path, fingerprint: str, force: bool) -> dict[str, dict]:
    """Make ``out`` ready for this export (the caller holds its lock); return the files an
    interrupted run of the very same export already finished (empty for a fresh export)."""
    state = folder_state(out, JOURNAL)
    if state.kind == "foreign":
        raise foreign_error(out, state)
    if state.kind == "bundle":
        if not force:
            raise BundleError(f"{out} already holds a complete bundle",
                              "pass --force to replace it, or choose another --out")
        m = state.manifest
        remove_listed(out, [*m.files, MANIFEST_NAME, *_journals_of(out)])
    elif state.kind == "unfinished":
        if state.journal_fingerprint == fingerprint and not force:
            remove_temp_files(out)  # half-written files of the interrupted run
            return state.journal_files
        if not force:
            raise BundleError(
                f"{out} holds an unfinished export of a different checkpoint or options",
                "rerun with the original options to resume, or pass --force to start over",
            )
        remove_listed(out, [*state.journal_files, JOURNAL])
    remove_temp_files(out)
    return {}


def _journals_of(out: Path) -> list[str]:
    from .requantize import JOURNAL as REQUANTIZE_JOURNAL

    return [j for j in (JOURNAL, REQUANTIZE_JOURNAL) if (out / j).is_file()]


def _still_valid(out: Path, rel: str, entry: dict) -> bool:
    try:
        path = resolve(out, rel, "journal entry")
    except BundleError:
        return False
    return (path.is_file() and path.stat().st_size == entry.get("bytes")
            and sha256_file(path) == entry.get("sha256"))


def export(model: str, out: Path, options: ExportOptions = ExportOptions()) -> Manifest:
    """Export checkpoint ``model`` (folder or hub id) to the bundle folder ``out``."""
    precisions = options.validate()
    out = Path(out)
    folder = resolve_model_path(model)
    ckpt = Checkpoint(folder)
    arch = get_architecture(ckpt.model_type)
    spec = arch.spec_from_config(ckpt.config)
    names = set(ckpt.names())
    mapping = arch.tensor_map(spec, names)
    check_coverage(mapping, spec, {n: ckpt.info(n).shape for n in names})
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(
            f"no tokenizer.json in {folder}",
            "save the fast tokenizer next to the weights (tokenizer.save_pretrained(folder))",
        )
    if options.quantizer == "gptq":
        _check_calibration_data(options, spec, folder)  # before the long stage 1, not after it
    fingerprint = _fingerprint(ckpt, precisions, options.block_size, options)
    state = folder_state(out, JOURNAL)  # refuse a foreign folder before writing anything into it
    if state.kind == "foreign":
        raise foreign_error(out, state)
    out.mkdir(parents=True, exist_ok=True)
    with bundle_lock(out, "export"):
        return _export_locked(model, folder, ckpt, spec, mapping, precisions, fingerprint, out, options)


def _export_locked(model: str, folder: Path, ckpt: Checkpoint, spec: ModelSpec, mapping: dict,
                   precisions: tuple[str, ...], fingerprint: str, out: Path, options: ExportOptions) -> Manifest:
    if options.quantizer == "gptq" and not options.force and _gptq_stage_pending(out, fingerprint):
        return _gptq_stage(out, options)  # resume: the data-free bundle was finished before the interruption
    done = _prepare_out(out, fingerprint, options.force)
    done = {rel: e for rel, e in done.items() if _still_valid(out, rel, e)}
    _check_disk(out, spec, precisions, options, folder, done)
    journal = Journal(out / JOURNAL, fingerprint, done)
    # gptq first writes a complete data-free (hqq) bundle, which the calibration pass then runs
    stage_quantizer = QuantizerOptions(FALLBACK if options.quantizer == "gptq" else options.quantizer,
                                       min_tokens=options.gptq_min_tokens)
    backbone_jobs = ["embed", *[str(layer) for layer in range(spec.num_layers)], "head"]
    backbone_rel = {"embed": "backbone/embed.onnx", "head": "backbone/head.onnx",
                    **{str(i): layer_path(i) for i in range(spec.num_layers)}}
    jobs: list[tuple] = [(_backbone_task, (str(folder), str(out), spec, mapping, w)) for w in backbone_jobs
                         if backbone_rel[w] not in done]
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            if all(expert_path(layer, e, p) in done for p in precisions):
                continue
            args = (str(folder), str(out), spec, mapping, layer, e, precisions, options.block_size, stage_quantizer)
            jobs.append((_expert_task, args))
    total = len(backbone_jobs) + spec.num_layers * spec.num_experts
    with Progress(TextColumn("[bold]export[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not options.progress, transient=False) as bar:
        task = bar.add_task(f"{spec.model_type} -> {out}", total=total, completed=total - len(jobs))
        if options.workers == 1:
            for fn, args in jobs:
                finished = fn(*args)
                done.update(finished)
                journal.record(finished)
                bar.advance(task)
        else:
            with worker_pool(options.workers) as pool:
                futures = [pool.submit(fn, *args) for fn, args in jobs]
                try:
                    for fut in futures:
                        finished = fut.result()
                        done.update(finished)
                        journal.record(finished)
                        bar.advance(task)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    for name in TOKENIZER_FILES:
        src = folder / name
        if src.is_file():
            rel = f"tokenizer/{name}"
            data = src.read_bytes()
            done[rel] = {"bytes": len(data), "sha256": atomic_write_bytes(resolve(out, rel), data)}
    manifest = _manifest(model, ckpt, spec, precisions, options.block_size, fingerprint, done, stage_quantizer.name)
    manifest.write(out)
    journal.remove()
    if options.quantizer == "gptq":
        return _gptq_stage(out, options)
    return manifest


def estimated_bytes(spec: ModelSpec, precisions: tuple[str, ...], block_size: int) -> int:
    """About how many bytes a bundle of ``spec`` takes: experts at every precision plus the
    float32 backbone (for the disk-space check before any work)."""
    H, V, D = spec.hidden_size, spec.vocab_size, spec.head_dim
    Q, KV = spec.num_heads * D, spec.num_kv_heads * D
    per_layer = Q * H * 2 + KV * H * 2 + spec.num_experts * H + 3 * spec.shared_intermediate_size * H + 4 * H
    backbone = 4 * (2 * V * H + spec.num_layers * per_layer)
    experts = sum(expected_bytes(H, spec.expert_intermediate_size, p, block_size) for p in precisions)
    return backbone + spec.num_layers * spec.num_experts * experts


def _check_disk(out: Path, spec: ModelSpec, precisions: tuple[str, ...], options: ExportOptions, folder: Path,
                done: dict[str, dict]) -> None:
    need = estimated_bytes(spec, precisions, options.block_size)
    need += sum((folder / n).stat().st_size for n in TOKENIZER_FILES if (folder / n).is_file())
    if options.quantizer == "gptq":  # the collected inputs and the requantized integer variants
        need += memory_bound(spec.num_layers, spec.num_experts, spec.hidden_size, options.inputs_per_expert)
        need += estimated_bytes(spec, tuple(p for p in precisions if p in BITS), options.block_size)
    need -= sum(int(e.get("bytes", 0)) for e in done.values())
    require_free_space(out, max(need, 0), f"exporting {spec.model_type} ({', '.join(precisions)})",
                       "free some space, or export fewer precisions (--precisions) or to another disk (--out)")


def _gptq_stage_pending(out: Path, fingerprint: str) -> bool:
    """True when ``out`` holds this very gptq export with its gptq stage unfinished: the data-free
    bundle done, or the requantization switched in but not yet cleaned up."""
    from dymoe.manifest import read_manifest

    from .requantize import JOURNAL as REQUANTIZE_JOURNAL

    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        m = read_manifest(out)
    except BundleError:
        return False
    if m.source.fingerprint_sha256 != fingerprint:
        return False
    return m.quantization.method == FALLBACK or (out / REQUANTIZE_JOURNAL).exists()


def _calibration_options(options: ExportOptions, context: int):
    from dymoe.calibration.options import SEQ_LEN, CalibrationOptions

    return CalibrationOptions(seq_len=min(SEQ_LEN, context), sensitivity=False, collect_inputs=True,
                              inputs_per_expert=options.inputs_per_expert)


def _check_calibration_data(options: ExportOptions, spec: ModelSpec, folder: Path) -> None:
    """Everything the gptq stage will need from its data and memory, checked up front."""
    from dymoe.calibration import data as data_mod
    from dymoe.calibration.inputs import available_memory, require_memory
    from dymoe.errors import DymoeError
    from dymoe.runtime.tokenizer import TextTokenizer

    calibration = _calibration_options(options, spec.max_position_embeddings)
    try:
        require_memory(spec.num_layers, spec.num_experts, spec.hidden_size, calibration.inputs_per_expert,
                       available_memory())
    except DymoeError as e:
        raise InputError(e.message, "lower --inputs-per-expert") from None
    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    try:  # exactly what the calibration pass will do with it
        data_mod.draw([Path(p) for p in options.calibration_data], TextTokenizer(folder / "tokenizer.json").encode,
                      eos, calibration.samples, calibration.seq_len, calibration.seed)
    except DymoeError as e:
        raise InputError(f"--calibration-data: {e.message}",
                         "give readable text (plain, JSON Lines with 'text', or folders of them) with at least "
                         f"{calibration.seq_len} tokens to --calibration-data") from None


def _gptq_stage(out: Path, options: ExportOptions) -> Manifest:
    """Collect every expert's routed inputs on the calibration text, then requantize with gptq."""
    from dymoe.calibration.run import calibrate
    from dymoe.manifest import read_manifest

    from .requantize import RequantizeOptions, requantize

    calibration = _calibration_options(options, read_manifest(out).model.max_position_embeddings)
    calibrate(out, [Path(p) for p in options.calibration_data], calibration, progress=options.progress)
    return requantize(out, RequantizeOptions(
        quantizer=QuantizerOptions("gptq", min_tokens=options.gptq_min_tokens), progress=options.progress))


# what a journal entry records about a variant besides its file (bytes, sha256): the manifest's fields
_VARIANT_FACTS = tuple(f.name for f in dataclasses.fields(ExpertVariant) if f.name not in ("path", "precision"))


def variant_of(rel: str, precision: str, entry: dict) -> ExpertVariant:
    """The manifest record of one written variant, from its journal entry."""
    return ExpertVariant(path=rel, precision=precision, **{k: entry.get(k) for k in _VARIANT_FACTS})


def entry_of(variant: ExpertVariant, file: FileEntry) -> dict:
    """The journal entry of a variant already in a manifest (the inverse of :func:`variant_of`)."""
    return {"bytes": file.bytes, "sha256": file.sha256, **{k: getattr(variant, k) for k in _VARIANT_FACTS}}


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version(), "dymoe": dymoe.__version__}
    for pkg in ("onnx", "numpy", "onnxruntime"):
        try:
            tools[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tools


def _manifest(model: str, ckpt: Checkpoint, spec: ModelSpec, precisions: tuple[str, ...], block_size: int,
              fingerprint: str, done: dict[str, dict], quantizer: str) -> Manifest:
    experts = []
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            variants = {}
            for p in precisions:
                rel = expert_path(layer, e, p)
                d = done[rel]
                variants[p] = variant_of(rel, p, d)
            experts.append(ExpertEntry(layer=layer, expert=e, variants=variants))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dymoe_version=dymoe.__version__,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=Source(model=str(model), model_type=spec.model_type, fingerprint_sha256=fingerprint,
                      source_bytes=ckpt.source_bytes()),
        model=spec,
        quantization=Quantization(precisions=list(precisions), block_size=block_size, method=quantizer,
                                  formats={p: FORMATS[p] for p in precisions}),
        tools=_tool_versions(),
        tokenizer=sorted(r for r in done if r.startswith("tokenizer/")),
        backbone=Backbone(embed="backbone/embed.onnx",
                          layers=[layer_path(i) for i in range(spec.num_layers)], head="backbone/head.onnx"),
        experts=experts,
        files={rel: FileEntry(bytes=d["bytes"], sha256=d["sha256"]) for rel, d in sorted(done.items())},
    )

