"""One expert variant on disk: quantize (for an integer precision), build its graph, write it
atomically, and the record of it that a journal and the manifest keep. Shared by export and
requantize."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dymoe.bundle.fsutil import atomic_write_bytes
from dymoe.bundle.manifest import ExpertVariant, FileEntry
from dymoe.bundle.paths import resolve

from .forms import build_variant
from .quantizers import QuantizerOptions


def write_model(out: Path, rel: str, model) -> dict:
    """Serialise an ONNX model to ``out/rel`` atomically; its journal entry (bytes, sha256)."""
    data = model.SerializeToString()
    return {"bytes": len(data), "sha256": atomic_write_bytes(resolve(out, rel), data)}


def write_expert(out: Path, rel: str, gate, up, down, precision: str, block_size: int, quantizer: QuantizerOptions,
                 name: str, inputs=None, fmt: str | None = None, memo: dict | None = None) -> dict:
    """Quantize (for an integer precision), build and atomically write one expert variant in format
    ``fmt`` (default: the portable one of its precision); return its journal entry: file size and
    sha256, errors, and what quantized it. ``memo``: see :func:`forms.build_variant`."""
    v = build_variant(gate, up, down, precision, block_size, quantizer, name, inputs, fmt, memo)
    entry = write_model(out, rel, v.model)
    entry.update(weight_rel_error=float(v.stats.weight_rel_error), output_rel_error=float(v.stats.output_rel_error))
    if v.quantizer:
        entry.update(quantizer=v.quantizer, quantizer_note=v.note, calibration_tokens=v.tokens,
                     routed_output_rel_error=v.routed_output_rel_error)
    return entry


# what a journal entry records about a variant besides its file (bytes, sha256): the manifest's fields
_VARIANT_FACTS = tuple(f.name for f in dataclasses.fields(ExpertVariant) if f.name not in ("path", "precision"))


def variant_of(rel: str, precision: str, entry: dict) -> ExpertVariant:
    """The manifest record of one written variant, from its journal entry."""
    return ExpertVariant(path=rel, precision=precision, **{k: entry.get(k) for k in _VARIANT_FACTS})


def entry_of(variant: ExpertVariant, file: FileEntry) -> dict:
    """The journal entry of a variant already in a manifest (the inverse of :func:`variant_of`)."""
    return {"bytes": file.bytes, "sha256": file.sha256, **{k: getattr(variant, k) for k in _VARIANT_FACTS}}
