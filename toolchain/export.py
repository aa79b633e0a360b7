"""``dymoe export``: checkpoint folder -> bundle, resumable and atomic.

Every output file is written atomically and recorded in a journal (``.dymoe-export.jsonl``)
together with its checksum and quantization statistics. ``manifest.json`` is written last, so
a folder without it is never mistaken for a bundle; rerunning the same command after an
interruption skips every file the journal vouches for and finishes the bundle.

The architecture module (``archs/``) decides everything model-specific: how config.json reads,
where each tensor comes from, and each layer's graph; this module only schedules and writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dymoe.bundle.completions import as_done
from dymoe.bundle.errors import BundleError, CheckpointError, InputError
from dymoe.bundle.folder import folder_state, foreign_error, remove_listed, remove_temp_files
from dymoe.bundle.fsutil import atomic_write_bytes, require_free_space, sha256_file
from dymoe.bundle.journal import Journal
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import (
    SCHEMA_VERSION,
    Backbone,
    ExpertEntry,
    FileEntry,
    Manifest,
    ModelSpec,
    Quantization,
    Source,
)
from dymoe.bundle.naming import (
    EMBED,
    EXPORT_JOURNAL,
    HEAD,
    JOURNALS,
    MANIFEST_NAME,
    expert_path,
    layer_path,
    router_path,
    tokenizer_path,
)
from dymoe.bundle.paths import resolve
from dymoe.bundle.progress import Counter
from dymoe.bundle.version import __version__

from .archs import base, get_architecture
from .backbone_forms import BackboneForm, bytes_per_weight, quantize_linears
from .blas import one_blas_thread, set_blas_threads
from .checkpoint import TOKENIZER_FILES, Checkpoint, resolve_model_path
from .expert_graph import expected_bytes
from .external_data import write_graph
from .forms import SYMMETRIC_QUANTIZERS
from .layout import Ref, check_coverage
from .options import EXTERNAL_DATA_BYTES, TARGET, ExportOptions
from .quantizers import QuantizerOptions
from .trt_graph import trt_block
from .variants import variant_of, write_expert
from .vocab_rows import VocabRows
from .workers import worker_pool

JOURNAL = EXPORT_JOURNAL


@dataclass
class CheckedCheckpoint:
    """A checkpoint checked for export: config read by its architecture, every tensor mapped."""

    folder: Path
    ckpt: Checkpoint
    arch: ModuleType
    settings: Any  # the architecture's Settings
    spec: ModelSpec
    mapping: dict[str, Ref]


def open_checkpoint(model: str) -> CheckedCheckpoint:
    """Open and check a checkpoint (config, every tensor mapped exactly once with the right
    shape, a tokenizer) without reading any weights."""
    folder = resolve_model_path(model)
    ckpt = Checkpoint(folder)
    arch = get_architecture(ckpt.model_type)
    settings = arch.read_config(ckpt.config)
    spec = arch.model_spec(settings)
    names = set(ckpt.names())
    mapping = arch.tensor_map(settings, names)
    check_coverage(mapping, arch.shapes(settings), {n: ckpt.info(n).shape for n in names}, spec.model_type)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(
            f"no tokenizer.json in {folder}",
            "save the fast tokenizer next to the weights (tokenizer.save_pretrained(folder))",
        )
    return CheckedCheckpoint(folder, ckpt, arch, settings, spec, mapping)


# --- work done per task (in this process or a worker) ------------------------------------

_CKPT: dict[str, Checkpoint] = {}


def _checkpoint(folder: str) -> Checkpoint:
    if folder not in _CKPT:
        _CKPT.clear()
        _CKPT[folder] = Checkpoint(Path(folder))
    return _CKPT[folder]


def _read(ckpt: Checkpoint, ref: Ref):
    return ckpt.read(ref.source, index=ref.index, rows=ref.rows)


def _vocab(ckpt: Checkpoint, ref: Ref) -> np.ndarray | VocabRows:
    """The embedding table or LM head, read a slab of rows at a time as it is quantized."""
    if ref.index is not None or ref.rows is not None:  # a slice of a fused tensor: small enough whole
        return _read(ckpt, ref)
    return VocabRows(lambda a, b: ckpt.read(ref.source, rows=(a, b)), ckpt.info(ref.source).shape)


def _expert_refs(mapping: dict[str, Ref], layer: int, expert: int) -> tuple[Ref, Ref, Ref]:
    """Where an expert's gate, up and down come from: all a worker needs of the mapping (the whole
    of it is 18k entries for a 48-layer, 128-expert model, too much to send with every expert)."""
    p = f"layers.{layer}.experts.{expert}."
    return mapping[p + "gate"], mapping[p + "up"], mapping[p + "down"]


def _expert_task(folder: str, out: str, refs: tuple[Ref, Ref, Ref], layer: int, expert: int,
                 precisions: tuple[str, ...], block_size: int, quantizer: QuantizerOptions,
                 formats: dict[str, str]) -> dict[str, dict]:
    ckpt = _checkpoint(folder)
    gate, up, down = (_read(ckpt, r) for r in refs)
    done, memo = {}, {}  # memo: what every precision derives from the same weights, derived once
    for prec in precisions:
        rel = expert_path(layer, expert, prec)
        done[rel] = write_expert(Path(out), rel, gate, up, down, prec, block_size, quantizer,
                                 name=f"l{layer}_e{expert}_{prec}", fmt=formats[prec], memo=memo)
    return done


def _backbone_task(folder: str, out: str, model_type: str, settings: Any, mapping: dict, what: str,
                   layer: int | None, form: BackboneForm = BackboneForm(),
                   limit: int = EXTERNAL_DATA_BYTES) -> dict[str, dict]:
    """One backbone graph: ``embed``, ``head``, a ``layer`` or a ``router`` (of ``layer``), its weights
    stored in ``form`` (routers stay float32), tensors beyond ``limit`` bytes in external data."""
    ckpt = _checkpoint(folder)
    d: base.Decoder = settings.decoder
    if what == "embed":
        rel, model = EMBED, base.embed_graph(_vocab(ckpt, mapping["embed"]), form, streamed=True)
    elif what == "head":
        lm = mapping["embed"] if d.tie_word_embeddings else mapping["lm_head"]
        rel, model = HEAD, base.head_graph(d, _read(ckpt, mapping["final_norm"]), _vocab(ckpt, lm), form,
                                           streamed=True)
    else:
        prefix = f"layers.{layer}."
        wanted = (lambda c: c.startswith(prefix + "router")) if what == "router" else (
            lambda c: c.startswith(prefix) and ".experts." not in c)
        tensors = {c[len(prefix):]: _read(ckpt, r) for c, r in mapping.items() if wanted(c)}
        if what == "router":
            rel, model = router_path(layer), base.router_graph(d, settings.routing, tensors, layer)
        else:
            rel, model = layer_path(layer), quantize_linears(
                get_architecture(model_type).layer_graph(settings, tensors, layer), form)
    return write_graph(Path(out), rel, model, limit)


def _backbone_tasks(tasks: list[tuple]) -> dict[str, dict]:
    """Several backbone graphs, one after another in one worker (``tasks``: each one's arguments)."""
    done: dict[str, dict] = {}
    for args in tasks:
        done.update(_backbone_task(*args))
    return done


# --- orchestration ------------------------------------------------------------------------


def fingerprint_of(source: CheckedCheckpoint, options: ExportOptions) -> str:
    """What the bundle is a function of: resuming needs the very same; a pipeline adds its own stages."""
    blob = json.dumps(
        {"checkpoint": source.ckpt.fingerprint(), "precisions": options.validate(), "block_size": options.block_size,
         "quantizer": options.quantizer, "extra": dict(options.fingerprint_extra), "dymoe": __version__,
         "schema": SCHEMA_VERSION, **({"target": options.target} if options.target != TARGET else {}),
         "backbone": [options.backbone_precision, options.external_data_bytes]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def export(model: str, out: Path, options: ExportOptions = ExportOptions(),
           source: CheckedCheckpoint | None = None) -> Manifest:
    """Export checkpoint ``model`` (folder or hub id; ``source`` when already opened) to the bundle
    folder ``out``."""
    precisions = options.validate()
    source = source or open_checkpoint(model)
    check_target(source.spec, options, precisions)
    fingerprint = fingerprint_of(source, options)
    out = prepare_folder(Path(out))
    with bundle_lock(out, "export"):
        return _export_locked(model, source, precisions, fingerprint, out, options)


def check_target(spec: ModelSpec, options: ExportOptions, precisions: tuple[str, ...]) -> None:
    """The forms of ``options.target`` must be possible for this model, before any work."""
    if options.formats.get("int4") != "qdq_sym_int4_fp16" or "int4" not in precisions:
        return
    for what, k in (("hidden_size", spec.hidden_size), ("expert intermediate size", spec.expert_intermediate_size)):
        if trt_block(k) is None:
            raise InputError(f"--target {options.target}: the model's {what} {k} is not a multiple of 64, and "
                             "TensorRT's INT4 blocks (64 or 128) must divide each projection's input features",
                             "export without int4 (--precisions), or with --target ort")
    if options.quantizer not in SYMMETRIC_QUANTIZERS:
        raise InputError(f"--target {options.target} quantizes int4 with {' or '.join(SYMMETRIC_QUANTIZERS)}, "
                         f"not {options.quantizer}", "use --quantizer hqq (the default) or rtn")


def prepare_folder(out: Path) -> Path:
    """Refuse a foreign ``out`` before writing anything into it; create it (and the parents)."""
    state = folder_state(out, JOURNAL)
    if state.kind == "foreign":
        raise foreign_error(out, state)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
        remove_listed(out, [*m.files, MANIFEST_NAME, *(j for j in JOURNALS if (out / j).is_file())])
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


def _still_valid(out: Path, rel: str, entry: dict) -> bool:
    try:
        path = resolve(out, rel, "journal entry")
    except BundleError:
        return False
    return (path.is_file() and path.stat().st_size == entry.get("bytes")
            and sha256_file(path) == entry.get("sha256"))


def _export_locked(model: str, src: CheckedCheckpoint, precisions: tuple[str, ...], fingerprint: str, out: Path,
                   options: ExportOptions) -> Manifest:
    spec = src.spec
    done = _prepare_out(out, fingerprint, options.force)
    done = {rel: e for rel, e in done.items() if _still_valid(out, rel, e)}
    done = {rel: e for rel, e in done.items() if all(d in done for d in e.get("external_data", ()))}
    _check_disk(out, src, precisions, options, done)
    journal = Journal(out / JOURNAL, fingerprint, done)
    quantizer = QuantizerOptions(options.quantizer)
    graphs = [("embed", None, EMBED), ("head", None, HEAD),
              *(("layer", layer, layer_path(layer)) for layer in range(spec.num_layers)),
              *(("router", layer, router_path(layer)) for layer in spec.moe_layers)]
    common = (str(src.folder), str(out))
    form = backbone_form(options)
    backbone = {what: [] for what in ("vocab", "other")}
    for what, layer, rel in graphs:
        if rel not in done:
            backbone["vocab" if what in ("embed", "head") else "other"].append(
                (*common, spec.model_type, src.settings, src.mapping, what, layer, form, options.external_data_bytes))
    # (function, arguments, graphs it writes). The embedding and the LM head go first, together:
    # the others overlap them, and no two workers ever hold a vocabulary-sized tensor at once.
    big = backbone["vocab"]
    jobs: list[tuple] = [(_backbone_tasks, (big,), len(big))] if big else []
    jobs += [(_backbone_task, a, 1) for a in backbone["other"]]
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            if all(expert_path(layer, e, p) in done for p in precisions):
                continue
            jobs.append((_expert_task, (*common, _expert_refs(src.mapping, layer, e), layer, e, precisions,
                                        options.block_size, quantizer, options.formats), 1))
    total = len(graphs) + len(spec.moe_layers) * spec.num_experts
    counter = Counter(options.progress, f"export {spec.model_type}", total, total - sum(j[2] for j in jobs))

    def record(finished: dict[str, dict], units: int) -> None:
        done.update(finished)
        journal.record(finished)
        counter.tick(units)

    with one_blas_thread():
        if options.workers == 1:
            for fn, args, units in jobs:
                record(fn(*args), units)
        else:
            with worker_pool(options.workers, setup=functools.partial(set_blas_threads, 1)) as pool:
                futures = {pool.submit(fn, *args): units for fn, args, units in jobs}
                try:
                    for fut in as_done(futures):  # journaled as they finish: a kill loses the least
                        record(fut.result(), futures[fut])
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    for name in TOKENIZER_FILES:
        path = src.folder / name
        if path.is_file():
            rel = tokenizer_path(name)
            data = path.read_bytes()
            done[rel] = {"bytes": len(data), "sha256": atomic_write_bytes(resolve(out, rel), data)}
    manifest = _manifest(model, src, precisions, options.block_size, fingerprint, done, quantizer.name,
                         options.formats, form)
    manifest.write(out)
    journal.remove()
    return manifest


def backbone_form(options: ExportOptions) -> BackboneForm:
    return BackboneForm(options.backbone_precision, options.block_size, options.quantizer, options.target)


def estimated_expert_bytes(spec: ModelSpec, precisions: tuple[str, ...], block_size: int) -> int:
    """About how many bytes every expert at each of ``precisions`` takes on disk."""
    per = sum(expected_bytes(spec.hidden_size, spec.expert_intermediate_size, p, block_size) for p in precisions)
    return len(spec.moe_layers) * spec.num_experts * per


def estimated_bytes(src: CheckedCheckpoint, precisions: tuple[str, ...], block_size: int,
                    backbone_precision: str = "fp32") -> int:
    """About how many bytes a bundle of ``src`` takes: experts at every precision plus the backbone
    at its precision and the float32 routers (for the disk-space check before any work)."""
    backbone = sum(_numel(shape) for name, shape in src.arch.shapes(src.settings).items() if ".experts." not in name)
    routers = len(src.spec.moe_layers) * src.spec.num_experts * src.spec.hidden_size
    per_weight = bytes_per_weight(backbone_precision, block_size)
    return (int(per_weight * backbone) + 4 * 2 * routers  # routers: in their own graph and in the layer's
            + estimated_expert_bytes(src.spec, precisions, block_size))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_disk(out: Path, src: CheckedCheckpoint, precisions: tuple[str, ...], options: ExportOptions,
                done: dict[str, dict]) -> None:
    need = estimated_bytes(src, precisions, options.block_size, options.backbone_precision)
    need += sum((src.folder / n).stat().st_size for n in TOKENIZER_FILES if (src.folder / n).is_file())
    need += options.reserve_bytes
    need -= sum(int(e.get("bytes", 0)) for e in done.values())
    require_free_space(out, max(need, 0), f"exporting {src.spec.model_type} ({', '.join(precisions)})",
                       "free some space, or export fewer precisions (--precisions) or to another disk (--out)")


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version(), "dymoe": __version__}
    for pkg in ("onnx", "numpy", "onnxruntime"):
        try:
            tools[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tools


def _manifest(model: str, src: CheckedCheckpoint, precisions: tuple[str, ...], block_size: int, fingerprint: str,
              done: dict[str, dict], quantizer: str, formats: dict[str, str], form: BackboneForm) -> Manifest:
    spec = src.spec
    experts = [ExpertEntry(layer=layer, expert=e,
                           variants={p: variant_of(expert_path(layer, e, p), p, done[expert_path(layer, e, p)])
                                     for p in precisions})
               for layer in spec.moe_layers for e in range(spec.num_experts)]
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dymoe_version=__version__,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=Source(model=str(model), model_type=spec.model_type, fingerprint_sha256=fingerprint,
                      source_bytes=src.ckpt.source_bytes()),
        model=spec,
        quantization=Quantization(precisions=list(precisions), block_size=block_size, method=quantizer,
                                  formats={p: formats[p] for p in precisions}),
        tools=_tool_versions(),
        tokenizer=sorted(r for r in done if r.startswith("tokenizer/")),
        backbone=Backbone(embed=EMBED, layers=[layer_path(i) for i in range(spec.num_layers)], head=HEAD,
                          routers=[router_path(layer) for layer in spec.moe_layers], precision=form.precision,
                          embedding=form.embedding, lm_head=form.lm_head,
                          quantizer=form.quantizer if form.quantized else None, formats=form.formats,
                          external_data={rel: e["external_data"] for rel, e in sorted(done.items())
                                         if e.get("external_data")}),
        experts=experts,
        architecture=base.settings_json(src.settings),
        files={rel: FileEntry(bytes=d["bytes"], sha256=d["sha256"]) for rel, d in sorted(done.items())},
    )
