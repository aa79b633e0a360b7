"""``dymoe export``: checkpoint folder -> bundle, resumable and atomic.

Every output file is written atomically and recorded in a journal (``.dymoe-export.jsonl``)
together with its checksum and quantization statistics. ``manifest.json`` is written last, so
a folder without it is never mistaken for a bundle; rerunning the same command after an
interruption skips every file the journal vouches for and finishes the bundle.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from dymoe.bundle.errors import BundleError, CheckpointError
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
from dymoe.bundle.naming import EMBED, EXPORT_JOURNAL, HEAD, JOURNALS, MANIFEST_NAME, expert_path, layer_path
from dymoe.bundle.paths import resolve
from dymoe.bundle.precisions import FORMATS
from dymoe.bundle.progress import Counter
from dymoe.bundle.version import __version__

from . import backbone_graph
from .archs import get_architecture
from .checkpoint import TOKENIZER_FILES, Checkpoint, resolve_model_path
from .expert_graph import expected_bytes
from .layout import Ref, check_coverage
from .options import ExportOptions
from .quantizers import QuantizerOptions
from .variants import variant_of, write_expert, write_model
from .workers import worker_pool

JOURNAL = EXPORT_JOURNAL


# --- work done per task (in this process or a worker) ------------------------------------

_CKPT: dict[str, Checkpoint] = {}


def _checkpoint(folder: str) -> Checkpoint:
    if folder not in _CKPT:
        _CKPT.clear()
        _CKPT[folder] = Checkpoint(Path(folder))
    return _CKPT[folder]


def _read(ckpt: Checkpoint, ref: Ref):
    return ckpt.read(ref.source, index=ref.index, rows=ref.rows)


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
        rel, model = EMBED, backbone_graph.embed_graph(_read(ckpt, mapping["embed"]))
    elif what == "head":
        lm = mapping["embed"] if spec.tie_word_embeddings else mapping["lm_head"]
        model = backbone_graph.head_graph(spec, _read(ckpt, mapping["final_norm"]), _read(ckpt, lm))
        rel = HEAD
    else:
        layer = int(what)
        prefix = f"layers.{layer}."
        tensors = {c[len(prefix):]: _read(ckpt, r) for c, r in mapping.items()
                   if c.startswith(prefix) and ".experts." not in c}
        rel, model = layer_path(layer), backbone_graph.layer_graph(spec, tensors, layer)
    return {rel: write_model(Path(out), rel, model)}


# --- orchestration ------------------------------------------------------------------------


def fingerprint_of(source: CheckedCheckpoint, options: ExportOptions) -> str:
    """What the bundle is a function of: resuming needs the very same; a pipeline adds its own stages."""
    blob = json.dumps(
        {"checkpoint": source.ckpt.fingerprint(), "precisions": options.validate(), "block_size": options.block_size,
         "quantizer": options.quantizer, "extra": dict(options.fingerprint_extra), "dymoe": __version__,
         "schema": SCHEMA_VERSION},
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


def export(model: str, out: Path, options: ExportOptions = ExportOptions(),
           source: CheckedCheckpoint | None = None) -> Manifest:
    """Export checkpoint ``model`` (folder or hub id; ``source`` when already opened) to the bundle
    folder ``out``."""
    precisions = options.validate()
    source = source or open_checkpoint(model)
    fingerprint = fingerprint_of(source, options)
    out = prepare_folder(Path(out))
    with bundle_lock(out, "export"):
        return _export_locked(model, source, precisions, fingerprint, out, options)


def prepare_folder(out: Path) -> Path:
    """Refuse a foreign ``out`` before writing anything into it; create it (and the parents)."""
    state = folder_state(out, JOURNAL)
    if state.kind == "foreign":
        raise foreign_error(out, state)
    out.mkdir(parents=True, exist_ok=True)
    return out


class CheckedCheckpoint:
    """A checkpoint checked for export: its config read, its tensors mapped onto the layout."""

    def __init__(self, folder: Path, ckpt: Checkpoint, spec: ModelSpec, mapping: dict[str, Ref]) -> None:
        self.folder, self.ckpt, self.spec, self.mapping = folder, ckpt, spec, mapping


def open_checkpoint(model: str) -> CheckedCheckpoint:
    """Open and check a checkpoint (config, every tensor mapped exactly once, a tokenizer) without
    reading any weights."""
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
    return CheckedCheckpoint(folder, ckpt, spec, mapping)


def _export_locked(model: str, src: CheckedCheckpoint, precisions: tuple[str, ...], fingerprint: str, out: Path,
                   options: ExportOptions) -> Manifest:
    folder, ckpt, spec, mapping = src.folder, src.ckpt, src.spec, src.mapping
    done = _prepare_out(out, fingerprint, options.force)
    done = {rel: e for rel, e in done.items() if _still_valid(out, rel, e)}
    _check_disk(out, spec, precisions, options, folder, done)
    journal = Journal(out / JOURNAL, fingerprint, done)
    quantizer = QuantizerOptions(options.quantizer)
    backbone_rel = {"embed": EMBED, "head": HEAD, **{str(i): layer_path(i) for i in range(spec.num_layers)}}
    jobs: list[tuple] = [(_backbone_task, (str(folder), str(out), spec, mapping, w)) for w, rel in backbone_rel.items()
                         if rel not in done]
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            if all(expert_path(layer, e, p) in done for p in precisions):
                continue
            args = (str(folder), str(out), spec, mapping, layer, e, precisions, options.block_size, quantizer)
            jobs.append((_expert_task, args))
    total = len(backbone_rel) + spec.num_layers * spec.num_experts
    counter = Counter(options.progress, f"export {spec.model_type}", total, total - len(jobs))
    if options.workers == 1:
        for fn, args in jobs:
            finished = fn(*args)
            done.update(finished)
            journal.record(finished)
            counter.tick()
    else:
        with worker_pool(options.workers) as pool:
            futures = [pool.submit(fn, *args) for fn, args in jobs]
            try:
                for fut in futures:
                    finished = fut.result()
                    done.update(finished)
                    journal.record(finished)
                    counter.tick()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            rel = f"tokenizer/{name}"
            data = path.read_bytes()
            done[rel] = {"bytes": len(data), "sha256": atomic_write_bytes(resolve(out, rel), data)}
    manifest = _manifest(model, ckpt, spec, precisions, options.block_size, fingerprint, done, quantizer.name)
    manifest.write(out)
    journal.remove()
    return manifest


def estimated_expert_bytes(spec: ModelSpec, precisions: tuple[str, ...], block_size: int) -> int:
    """About how many bytes every expert at each of ``precisions`` takes on disk."""
    per = sum(expected_bytes(spec.hidden_size, spec.expert_intermediate_size, p, block_size) for p in precisions)
    return spec.num_layers * spec.num_experts * per


def estimated_bytes(spec: ModelSpec, precisions: tuple[str, ...], block_size: int) -> int:
    """About how many bytes a bundle of ``spec`` takes: experts at every precision plus the
    float32 backbone (for the disk-space check before any work)."""
    H, V, D = spec.hidden_size, spec.vocab_size, spec.head_dim
    Q, KV = spec.num_heads * D, spec.num_kv_heads * D
    per_layer = Q * H * 2 + KV * H * 2 + spec.num_experts * H + 3 * spec.shared_intermediate_size * H + 4 * H
    backbone = 4 * (2 * V * H + spec.num_layers * per_layer)
    return backbone + estimated_expert_bytes(spec, precisions, block_size)


def _check_disk(out: Path, spec: ModelSpec, precisions: tuple[str, ...], options: ExportOptions, folder: Path,
                done: dict[str, dict]) -> None:
    need = estimated_bytes(spec, precisions, options.block_size)
    need += sum((folder / n).stat().st_size for n in TOKENIZER_FILES if (folder / n).is_file())
    need += options.reserve_bytes
    need -= sum(int(e.get("bytes", 0)) for e in done.values())
    require_free_space(out, max(need, 0), f"exporting {spec.model_type} ({', '.join(precisions)})",
                       "free some space, or export fewer precisions (--precisions) or to another disk (--out)")


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version(), "dymoe": __version__}
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
        dymoe_version=__version__,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=Source(model=str(model), model_type=spec.model_type, fingerprint_sha256=fingerprint,
                      source_bytes=ckpt.source_bytes()),
        model=spec,
        quantization=Quantization(precisions=list(precisions), block_size=block_size, method=quantizer,
                                  formats={p: FORMATS[p] for p in precisions}),
        tools=_tool_versions(),
        tokenizer=sorted(r for r in done if r.startswith("tokenizer/")),
        backbone=Backbone(embed=EMBED, layers=[layer_path(i) for i in range(spec.num_layers)], head=HEAD),
        experts=experts,
        files={rel: FileEntry(bytes=d["bytes"], sha256=d["sha256"]) for rel, d in sorted(done.items())},
    )

