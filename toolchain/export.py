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
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import dymoe
from dymoe import defaults
from dymoe.errors import BundleError, CheckpointError, InputError
from dymoe.fsutil import atomic_write_bytes, sha256_file
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

from . import backbone_graph
from .archs import get_architecture
from .checkpoint import TOKENIZER_FILES, Checkpoint, resolve_model_path
from .expert_graph import PRECISIONS, build_expert_model
from .journal import Journal, read_journal
from .layout import Ref, check_coverage

JOURNAL = ".dymoe-export.jsonl"
FORMATS = {"fp32": "float", "fp16": "float", "int8": "qdq", "int4": "qdq", "int2": "matmulnbits"}


@dataclass(frozen=True)
class ExportOptions:
    precisions: tuple[str, ...] = defaults.PRECISIONS
    block_size: int = defaults.BLOCK_SIZE
    workers: int = defaults.EXPORT_WORKERS
    force: bool = False
    progress: bool = True

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
    sha = atomic_write_bytes(out / rel, data)
    return {"bytes": len(data), "sha256": sha}


def _expert_task(folder: str, out: str, spec: ModelSpec, mapping: dict, layer: int, expert: int,
                 precisions: tuple[str, ...], block_size: int) -> dict[str, dict]:
    ckpt = _checkpoint(folder)
    p = f"layers.{layer}.experts.{expert}."
    gate, up, down = (_read(ckpt, mapping[p + n]) for n in ("gate", "up", "down"))
    done = {}
    for prec in precisions:
        model, stats = build_expert_model(gate, up, down, prec, block_size, name=f"l{layer}_e{expert}_{prec}")
        rel = expert_path(layer, expert, prec)
        entry = _write_model(Path(out), rel, model)
        del model
        entry.update(weight_rel_error=float(stats.weight_rel_error), output_rel_error=float(stats.output_rel_error))
        done[rel] = entry
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


def _fingerprint(ckpt: Checkpoint, precisions: tuple[str, ...], block_size: int) -> str:
    blob = json.dumps(
        {"checkpoint": ckpt.fingerprint(), "precisions": precisions, "block_size": block_size,
         "dymoe": dymoe.__version__, "schema": SCHEMA_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out(out: Path, fingerprint: str, force: bool) -> dict[str, dict]:
    """Return the journal's finished files (empty for a fresh export)."""
    journal = out / JOURNAL
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file", "choose a folder for the bundle")
    if (out / MANIFEST_NAME).exists():
        if not force:
            raise BundleError(
                f"{out} already holds a complete bundle",
                "pass --force to overwrite it, or choose another --out",
            )
        shutil.rmtree(out)
    elif journal.exists():
        previous, done = read_journal(journal)
        if previous == fingerprint and not force:
            for stale in out.rglob(".*.tmp"):  # half-written files of the interrupted run
                stale.unlink()
            return done
        if not force:
            raise BundleError(
                f"{out} holds an unfinished export of a different checkpoint or options",
                "rerun with the original options to resume, or pass --force to start over",
            )
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise InputError(
            f"--out {out} is not empty and is not a dymoe bundle",
            "choose a new or empty folder (dymoe never overwrites foreign files)",
        )
    out.mkdir(parents=True, exist_ok=True)
    return {}


def _still_valid(out: Path, rel: str, entry: dict) -> bool:
    path = out / rel
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


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
    fingerprint = _fingerprint(ckpt, precisions, options.block_size)
    done = _prepare_out(out, fingerprint, options.force)
    done = {rel: e for rel, e in done.items() if _still_valid(out, rel, e)}
    journal = Journal(out / JOURNAL, fingerprint, done)
    backbone_jobs = ["embed", *[str(layer) for layer in range(spec.num_layers)], "head"]
    backbone_rel = {"embed": "backbone/embed.onnx", "head": "backbone/head.onnx",
                    **{str(i): layer_path(i) for i in range(spec.num_layers)}}
    jobs: list[tuple] = [(_backbone_task, (str(folder), str(out), spec, mapping, w)) for w in backbone_jobs
                         if backbone_rel[w] not in done]
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            if all(expert_path(layer, e, p) in done for p in precisions):
                continue
            args = (str(folder), str(out), spec, mapping, layer, e, precisions, options.block_size)
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
            with ProcessPoolExecutor(max_workers=options.workers) as pool:
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
            done[rel] = {"bytes": len(data), "sha256": atomic_write_bytes(out / rel, data)}
    manifest = _manifest(model, ckpt, spec, precisions, options.block_size, fingerprint, done)
    manifest.write(out)
    journal.remove()
    return manifest


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version(), "dymoe": dymoe.__version__}
    for pkg in ("onnx", "numpy", "onnxruntime"):
        try:
            tools[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tools


def _manifest(model: str, ckpt: Checkpoint, spec: ModelSpec, precisions: tuple[str, ...], block_size: int,
              fingerprint: str, done: dict[str, dict]) -> Manifest:
    experts = []
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            variants = {}
            for p in precisions:
                rel = expert_path(layer, e, p)
                d = done[rel]
                variants[p] = ExpertVariant(path=rel, precision=p, weight_rel_error=d["weight_rel_error"],
                                            output_rel_error=d["output_rel_error"])
            experts.append(ExpertEntry(layer=layer, expert=e, variants=variants))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dymoe_version=dymoe.__version__,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=Source(model=str(model), model_type=spec.model_type, fingerprint_sha256=fingerprint,
                      source_bytes=ckpt.source_bytes()),
        model=spec,
        quantization=Quantization(precisions=list(precisions), block_size=block_size, method="rtn",
                                  formats={p: FORMATS[p] for p in precisions}),
        tools=_tool_versions(),
        tokenizer=sorted(r for r in done if r.startswith("tokenizer/")),
        backbone=Backbone(embed="backbone/embed.onnx",
                          layers=[layer_path(i) for i in range(spec.num_layers)], head="backbone/head.onnx"),
        experts=experts,
        files={rel: FileEntry(bytes=d["bytes"], sha256=d["sha256"]) for rel, d in sorted(done.items())},
    )

