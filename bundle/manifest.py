"""The bundle manifest: the single contract between ``dymoe export`` and ``dymoe run``.

Plain dataclasses, a schema version, and a sha256 for every file. The reader is strict: an
unknown or missing field is an error naming the field, so a bundle written by a different
version never half-works. The runtime finds every file through this manifest, never by name.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dymoe.bundle.errors import BundleError, ChecksumError
from dymoe.bundle.fsutil import atomic_write_text, sha256_file
from dymoe.bundle.naming import MANIFEST_NAME
from dymoe.bundle.paths import check_relative, is_sha256, resolve, resolve_file
from dymoe.bundle.precisions import KNOWN_FORMATS
from dymoe.bundle.precisions import PRECISIONS as KNOWN_PRECISIONS

SCHEMA_VERSION = 2
# 1: before each quantized variant recorded its quantizer (all of them were round-to-nearest);
# read by filling that in, written back as 2.
READABLE_SCHEMA_VERSIONS = (1, 2)
QK_NORMS = ("none", "head", "full")


@dataclass
class ModelSpec:
    """Architecture facts, in one canonical vocabulary for every supported ``model_type``."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # 0: no shared expert
    shared_expert_gate: bool  # shared expert output scaled by sigmoid(x . w)
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    qk_norm: str  # "none" | "head" (RMSNorm per head, Qwen3) | "full" (over all heads, OLMoE)
    clip_qkv: float | None  # clamp q, k, v projections to +-clip_qkv (OLMoE option)
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]


_POSITIVE = ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
             "top_k", "expert_intermediate_size", "max_position_embeddings")


def spec_problems(s: ModelSpec) -> list[tuple[str, str]]:
    """Every way ``s`` describes an impossible model, as ``(field, what is wrong)``; the export
    checks a checkpoint's config with it, and the reader checks every manifest."""
    out = [(f, f"is {getattr(s, f)}, must be at least 1") for f in _POSITIVE if getattr(s, f) < 1]
    bad = {f for f, _ in out}
    if "num_experts" not in bad and "top_k" not in bad and s.top_k > s.num_experts:
        out.append(("top_k", f"is {s.top_k}, more than the {s.num_experts} experts per layer"))
    if "num_heads" not in bad and "num_kv_heads" not in bad and s.num_heads % s.num_kv_heads:
        out.append(("num_kv_heads", f"is {s.num_kv_heads}, which does not divide the {s.num_heads} attention heads"))
    if "head_dim" not in bad and s.head_dim % 2:
        out.append(("head_dim", f"is {s.head_dim}; the rotary embedding needs an even head size"))
    if s.shared_intermediate_size < 0:
        out.append(("shared_intermediate_size", f"is {s.shared_intermediate_size}, must not be negative"))
    for f in ("rms_norm_eps", "rope_theta"):
        v = getattr(s, f)
        if not (v > 0 and v < float("inf")):
            out.append((f, f"is {v}, must be a positive number"))
    if s.sliding_window is not None and s.sliding_window < 1:
        out.append(("sliding_window", f"is {s.sliding_window}, must be at least 1 (or absent)"))
    if s.clip_qkv is not None and not s.clip_qkv > 0:
        out.append(("clip_qkv", f"is {s.clip_qkv}, must be positive (or absent)"))
    if s.qk_norm not in QK_NORMS:
        out.append(("qk_norm", f"is {s.qk_norm!r}, must be one of {', '.join(QK_NORMS)}"))
    for i, t in enumerate(s.eos_token_ids):
        if not 0 <= t < max(s.vocab_size, 1):
            out.append((f"eos_token_ids[{i}]", f"is {t}, outside the vocabulary of {s.vocab_size}"))
    if s.bos_token_id is not None and not 0 <= s.bos_token_id < max(s.vocab_size, 1):
        out.append(("bos_token_id", f"is {s.bos_token_id}, outside the vocabulary of {s.vocab_size}"))
    return out


@dataclass
class FileEntry:
    bytes: int
    sha256: str


@dataclass
class ExpertVariant:
    path: str
    precision: str
    weight_rel_error: float  # ||W - W_q|| / ||W|| over gate, up and down together
    output_rel_error: float  # ||y - y_q|| / ||y|| on a fixed seeded Gaussian input
    quantizer: str | None = None  # rtn | hqq | gptq: what chose the codes (None: float precision)
    quantizer_note: str | None = None  # why it is not the quantizer asked for (gptq -> hqq fallback)
    calibration_tokens: int | None = None  # routed calibration tokens of this expert the quantizer saw
    routed_output_rel_error: float | None = None  # ||y - y_q|| / ||y|| on those routed tokens


@dataclass
class ExpertEntry:
    layer: int
    expert: int
    variants: dict[str, ExpertVariant]


@dataclass
class Backbone:
    embed: str
    layers: list[str]
    head: str


@dataclass
class Quantization:
    precisions: list[str]  # highest first
    block_size: int
    method: str  # quantizer asked for: "rtn" | "hqq" | "gptq" (per variant: ExpertVariant.quantizer)
    formats: dict[str, str]  # precision -> "float" | "qdq" | "matmulnbits"
    revision: str | None = None  # set by dymoe requantize: fingerprint of its quantizer, settings and inputs


@dataclass
class Source:
    model: str
    model_type: str
    fingerprint_sha256: str
    source_bytes: int


@dataclass
class Manifest:
    schema_version: int
    dymoe_version: str
    created_utc: str
    source: Source
    model: ModelSpec
    quantization: Quantization
    tools: dict[str, str]
    tokenizer: list[str]
    backbone: Backbone
    experts: list[ExpertEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    calibration: str | None = None  # relative path of calibration.json (dymoe calibrate), listed in files

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        entry = self.experts[layer * self.model.num_experts + expert]
        assert entry.layer == layer and entry.expert == expert
        return entry

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False) + "\n"

    def write(self, bundle: Path) -> None:
        atomic_write_text(Path(bundle) / MANIFEST_NAME, self.to_json())


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(where, "a list", value)
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, "an object", value)
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, "an integer", value)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _bad(where, f"a {tp.__name__}", value)
        return value
    raise TypeError(f"unsupported manifest field type {tp!r} at {where}")


def _bad(where: str, what: str, value: Any) -> BundleError:
    return BundleError(
        f"manifest.json: field '{where}' must be {what}, not {type(value).__name__}",
        "the bundle is corrupt or from another dymoe version; re-export it",
    )


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown and missing fields by name."""
    if not isinstance(data, dict):
        raise _bad(where or "(top level)", "an object", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(
            f"manifest.json: unknown field '{_join(where, unknown[0])}'",
            "the bundle was written by a newer or different dymoe; re-export it with this version",
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise BundleError(
                f"manifest.json: missing field '{_join(where, name)}'",
                "the bundle is incomplete or from an older dymoe; re-export it",
            )
        kwargs[name] = _convert(hints[name], data[name], _join(where, name))
    return cls(**kwargs)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``BUNDLE/manifest.json`` (structure only; see :func:`verify_file`)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"no bundle folder at {bundle}", "create one with: dymoe export MODEL --out BUNDLE")
    if not path.is_file():
        hint = "rerun the same dymoe export command to finish it" if any(bundle.iterdir()) else (
            "create one with: dymoe export MODEL --out BUNDLE")
        raise BundleError(f"{bundle} has no manifest.json (an unfinished or foreign folder)", hint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e})", "re-export the bundle") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:
        raise BundleError(
            f"{path}: schema_version {version!r}, this dymoe reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
            "re-export the bundle with this dymoe version",
        )
    manifest = from_dict(Manifest, data)
    check_manifest(manifest)
    if version == 1:
        for entry in manifest.experts:
            for v in entry.variants.values():
                if manifest.quantization.formats.get(v.precision) != "float":
                    v.quantizer = "rtn"
        manifest.schema_version = SCHEMA_VERSION
    return manifest


def _corrupt(what: str) -> BundleError:
    return BundleError(f"manifest.json: {what}", "the bundle is corrupt or was not written by dymoe; re-export it")


def check_manifest(m: Manifest) -> None:
    """Everything the manifest names must be consistent before anything is opened: file names
    are plain relative paths with a sha256 each, every referenced file is listed, the model is
    possible, and every expert has every precision the bundle declares."""
    for rel, f in m.files.items():
        check_relative(rel, "manifest.json: files entry")
        if not is_sha256(f.sha256):
            raise _corrupt(f"files[{rel!r}].sha256 is not a sha256 hex digest")
        if f.bytes < 0:
            raise _corrupt(f"files[{rel!r}].bytes is negative")
    if not is_sha256(m.source.fingerprint_sha256):
        raise _corrupt("source.fingerprint_sha256 is not a sha256 hex digest")
    problems = spec_problems(m.model)
    if problems:
        field_name, what = problems[0]
        raise _corrupt(f"model.{field_name} {what}")
    q = m.quantization
    unknown = [p for p in q.precisions if p not in KNOWN_PRECISIONS]
    if unknown or not q.precisions or len(set(q.precisions)) != len(q.precisions):
        raise _corrupt(f"quantization.precisions {q.precisions} must be distinct names from "
                       f"{', '.join(KNOWN_PRECISIONS)}")
    if sorted(q.formats) != sorted(q.precisions) or any(v not in KNOWN_FORMATS for v in q.formats.values()):
        raise _corrupt(f"quantization.formats {q.formats} must give one of {', '.join(KNOWN_FORMATS)} per precision")
    refs = [("backbone.embed", m.backbone.embed), ("backbone.head", m.backbone.head),
            *((f"backbone.layers[{i}]", r) for i, r in enumerate(m.backbone.layers)),
            *((f"tokenizer[{i}]", r) for i, r in enumerate(m.tokenizer))]
    if m.calibration is not None:
        refs.append(("calibration", m.calibration))
    if len(m.backbone.layers) != m.model.num_layers:
        raise _corrupt(f"backbone.layers lists {len(m.backbone.layers)} graphs for {m.model.num_layers} layers")
    E = m.model.num_experts
    if len(m.experts) != m.model.num_layers * E:
        raise _corrupt(f"experts lists {len(m.experts)} entries, expected {m.model.num_layers} x {E}")
    for i, entry in enumerate(m.experts):
        if (entry.layer, entry.expert) != divmod(i, E):
            raise _corrupt(f"experts[{i}] is layer {entry.layer} expert {entry.expert}, expected {divmod(i, E)}")
        if sorted(entry.variants) != sorted(q.precisions):
            raise _corrupt(f"experts[{i}] has variants {sorted(entry.variants)}, expected {q.precisions}")
        for p, v in entry.variants.items():
            if v.precision != p:
                raise _corrupt(f"experts[{i}].variants.{p}.precision is {v.precision!r}")
            refs.append((f"experts[{i}].variants.{p}.path", v.path))
    for where, rel in refs:
        check_relative(rel, f"manifest.json: {where}")
        if rel not in m.files:
            raise _corrupt(f"{where} names {rel!r}, which files does not list")


def check_confined(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest lists resolves inside the bundle (no symbolic link out of it):
    writers check this before they change or delete anything."""
    for rel in manifest.files:
        resolve(bundle, rel, "manifest.json: files entry")


def verify_file(bundle: Path, manifest: Manifest, rel: str) -> Path:
    """Check one bundle file's size and sha256 against the manifest; return its (real) path."""
    entry = file_entry(manifest, rel)
    path = resolve_file(bundle, rel)
    size = path.stat().st_size
    if size != entry.bytes or sha256_file(path) != entry.sha256:
        raise ChecksumError(
            f"checksum mismatch: {path} does not match manifest.json "
            f"({size} bytes, expected {entry.bytes})",
            "the file was changed or damaged; re-export the bundle",
        )
    return path


def file_entry(manifest: Manifest, rel: str) -> FileEntry:
    entry = manifest.files.get(rel)
    if entry is None:
        raise BundleError(f"manifest.json lists no file {rel}", "re-export the bundle")
    return entry


def check_bytes(bundle: Path, manifest: Manifest, rel: str, data: bytes) -> bytes:
    """``data`` as read from ``BUNDLE/rel``, checked against the manifest's size and sha256."""
    import hashlib

    entry = file_entry(manifest, rel)
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ChecksumError(
            f"checksum mismatch: {Path(bundle) / rel} does not match manifest.json "
            f"({len(data)} bytes, expected {entry.bytes})",
            "the file was changed or damaged; re-export the bundle",
        )
    return data


def read_verified(bundle: Path, manifest: Manifest, rel: str) -> bytes:
    """Read a bundle file once, checking its size and sha256; the bytes go straight to ORT."""
    file_entry(manifest, rel)
    data = resolve_file(bundle, rel).read_bytes()
    return check_bytes(bundle, manifest, rel, data)


def bundle_path(bundle: Path, rel: str) -> Path:
    """Where ``rel`` lives, confined to the bundle (for files about to be written or read later)."""
    return resolve(bundle, rel)
