"""The bundle manifest: the single contract between ``dymoe export`` and ``dymoe run``.

Plain dataclasses, a schema version, and a sha256 for every file. The reader is strict: an
unknown or missing field is an error naming the field, so a bundle written by a different
version never half-works. The runtime finds every file through this manifest, never by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dymoe.bundle.errors import BundleError, ChecksumError
from dymoe.bundle.fsutil import atomic_write_text, sha256_file
from dymoe.bundle.naming import MANIFEST_NAME
from dymoe.bundle.paths import check_relative, is_sha256, resolve, resolve_file
from dymoe.bundle.precisions import BACKBONE_PRECISIONS, BITS, FORMAT_PRECISIONS, KNOWN_FORMATS, VOCAB_PRECISIONS
from dymoe.bundle.precisions import PRECISIONS as KNOWN_PRECISIONS
from dymoe.bundle.strict import from_dict

SCHEMA_VERSION = 4
# 1 and 2: layer graphs returned router logits and the runtime routed; `dymoe upgrade` rewrites
# such a bundle's backbone (its experts are kept as they are)
OLD_SCHEMA_VERSIONS = (1, 2)
# 3: the same graphs, but the manifest did not yet say how the backbone is stored (always float32,
# inline): `dymoe upgrade` rewrites manifest.json alone
MANIFEST_ONLY_VERSIONS = (3,)


@dataclass
class CacheTensor:
    """One tensor of a layer's KV cache: the layer graph's ``past_{name}`` input ``[heads, P, dim]``
    and ``present_{name}`` output ``[heads, S, dim]`` (MLA keeps a compressed latent, GQA keys
    and values per KV head)."""

    name: str
    heads: int
    dim: int


@dataclass
class ModelSpec:
    """What the runtime and calibration need to know of a model, whatever its architecture. The
    architecture's own settings (attention kind, heads, rope, routing rule) are in the manifest's
    ``architecture`` object; its maths is in the layer graphs."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_experts: int  # routed experts per MoE layer
    top_k: int  # experts each token is routed to
    expert_intermediate_size: int
    moe_layers: list[int]  # layers with routed experts, ascending; the others are dense
    kv_cache: list[CacheTensor]  # per layer, the same for every layer
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def kv_bytes_per_token(self) -> int:
        """float32 KV cache bytes one token adds over all layers."""
        return 4 * self.num_layers * sum(c.heads * c.dim for c in self.kv_cache)


_POSITIVE = ("hidden_size", "vocab_size", "num_layers", "num_experts", "top_k", "expert_intermediate_size",
             "max_position_embeddings")


def spec_problems(s: ModelSpec) -> list[tuple[str, str]]:
    """Every way ``s`` describes an impossible model, as ``(field, what is wrong)``; the export
    checks a checkpoint's config with it, and the reader checks every manifest."""
    out = [(f, f"is {getattr(s, f)}, must be at least 1") for f in _POSITIVE if getattr(s, f) < 1]
    bad = {f for f, _ in out}
    if "num_experts" not in bad and "top_k" not in bad and s.top_k > s.num_experts:
        out.append(("top_k", f"is {s.top_k}, more than the {s.num_experts} experts per layer"))
    if not s.moe_layers or s.moe_layers != sorted(set(s.moe_layers)) or not (
            0 <= s.moe_layers[0] and s.moe_layers[-1] < s.num_layers):
        out.append(("moe_layers", f"is {s.moe_layers}: must be distinct ascending layers in 0..{s.num_layers - 1}, "
                                  "at least one"))
    names = [c.name for c in s.kv_cache]
    if not s.kv_cache or len(set(names)) != len(names) or any(c.heads < 1 or c.dim < 1 for c in s.kv_cache) \
            or not all(n.isidentifier() for n in names):
        out.append(("kv_cache", "must list distinct named cache tensors with positive heads and dim"))
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
    layers: list[str]  # one graph per layer
    head: str
    routers: list[str]  # one small routing graph per MoE layer (model.moe_layers order): the look-ahead predictor
    # schema 4: how the backbone's weights are stored (the defaults are what schema 3 always wrote)
    precision: str = "fp32"  # the layers' linear weights: attention, shared experts, dense MLPs (BACKBONE_PRECISIONS)
    embedding: str = "fp32"  # the embedding table (VOCAB_PRECISIONS)
    lm_head: str = "fp32"  # the LM head's weight (VOCAB_PRECISIONS)
    quantizer: str | None = None  # rtn | hqq: what chose the integer codes (blocks of quantization.block_size)
    formats: dict[str, str] = field(default_factory=dict)  # integer precision of a linear -> qdq | matmulnbits
    # graph -> the files holding its large tensors (ONNX external data, beside the graph; each in `files`):
    # a protobuf cannot exceed 2 GiB, and a 151,936 x 2048 float32 embedding alone is 1.2 GB
    external_data: dict[str, list[str]] = field(default_factory=dict)

    def graphs(self) -> list[str]:
        return [self.embed, *self.layers, self.head, *self.routers]


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
    architecture: dict[str, Any]  # the architecture's own settings the graphs were built from (informative)
    files: dict[str, FileEntry] = field(default_factory=dict)
    calibration: str | None = None  # relative path of calibration.json (dymoe calibrate), listed in files

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        """The entry of ``expert`` in MoE layer ``layer`` (experts are listed layer by layer)."""
        try:
            slot = self.model.moe_layers.index(layer)
        except ValueError:
            raise BundleError(f"layer {layer} has no routed experts (it is a dense layer)",
                              "ask for one of the MoE layers " + str(self.model.moe_layers)) from None
        entry = self.experts[slot * self.model.num_experts + expert]
        assert entry.layer == layer and entry.expert == expert
        return entry

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False) + "\n"

    def write(self, bundle: Path) -> None:
        atomic_write_text(Path(bundle) / MANIFEST_NAME, self.to_json())


def read_json(bundle: Path) -> dict:
    """``BUNDLE/manifest.json`` parsed, any schema version (clean errors for a missing folder or file)."""
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
    if not isinstance(data, dict):
        raise BundleError(f"{path}: field '(top level)' must be an object, not {type(data).__name__}",
                          "re-export the bundle")
    return data


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``BUNDLE/manifest.json`` (structure only; see :func:`verify_file`)."""
    data = read_json(bundle)
    path = Path(bundle) / MANIFEST_NAME
    version = data.get("schema_version")
    if type(version) is int and version in OLD_SCHEMA_VERSIONS:
        raise BundleError(f"{path}: schema_version {version}, written by an older dymoe whose layer graphs this "
                          f"version no longer runs", f"upgrade it in place (the experts are kept): dymoe upgrade "
                                                     f"{bundle}")
    if type(version) is int and version in MANIFEST_ONLY_VERSIONS:
        raise BundleError(f"{path}: schema_version {version}, written by an older dymoe that did not record how the "
                          f"backbone is stored", f"upgrade it in place (only manifest.json changes): dymoe upgrade "
                                                 f"{bundle}")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r}, this dymoe reads {SCHEMA_VERSION}",
                          "re-export the bundle with this dymoe version")
    manifest = from_dict(Manifest, data)
    check_manifest(manifest)
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
    for p, fmt in q.formats.items():
        if p not in FORMAT_PRECISIONS[fmt]:
            raise _corrupt(f"quantization.formats.{p} is {fmt!r}, a format for "
                           f"{', '.join(FORMAT_PRECISIONS[fmt])} only")
    refs = [("backbone.embed", m.backbone.embed), ("backbone.head", m.backbone.head),
            *((f"backbone.layers[{i}]", r) for i, r in enumerate(m.backbone.layers)),
            *((f"tokenizer[{i}]", r) for i, r in enumerate(m.tokenizer))]
    if m.calibration is not None:
        refs.append(("calibration", m.calibration))
    if len(m.backbone.layers) != m.model.num_layers:
        raise _corrupt(f"backbone.layers lists {len(m.backbone.layers)} graphs for {m.model.num_layers} layers")
    moe, E = m.model.moe_layers, m.model.num_experts
    if len(m.backbone.routers) != len(moe):
        raise _corrupt(f"backbone.routers lists {len(m.backbone.routers)} graphs for {len(moe)} MoE layers")
    refs += [(f"backbone.routers[{i}]", r) for i, r in enumerate(m.backbone.routers)]
    refs += _check_backbone_storage(m.backbone)
    if len(m.experts) != len(moe) * E:
        raise _corrupt(f"experts lists {len(m.experts)} entries, expected {len(moe)} MoE layers x {E}")
    for i, entry in enumerate(m.experts):
        want = (moe[i // E], i % E)
        if (entry.layer, entry.expert) != want:
            raise _corrupt(f"experts[{i}] is layer {entry.layer} expert {entry.expert}, expected {want}")
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


def _check_backbone_storage(b: Backbone) -> list[tuple[str, str]]:
    """The backbone's precisions are known ones, and each external data file sits beside its own
    graph (ONNX names it relative to the graph's folder) and belongs to one graph only; returns the
    data files as references that ``files`` must list."""
    if b.precision not in BACKBONE_PRECISIONS:
        raise _corrupt(f"backbone.precision is {b.precision!r}, not one of {', '.join(BACKBONE_PRECISIONS)}")
    for name, value in (("embedding", b.embedding), ("lm_head", b.lm_head)):
        if value not in VOCAB_PRECISIONS:
            raise _corrupt(f"backbone.{name} is {value!r}, not one of {', '.join(VOCAB_PRECISIONS)}")
    if (b.quantizer is None) == any(p in BITS for p in (b.precision, b.embedding, b.lm_head)):
        raise _corrupt(f"backbone.quantizer is {b.quantizer!r}: it names the quantizer exactly when a backbone "
                       "precision is an integer one")
    linears = {p for p in (b.precision, b.lm_head) if p in BITS}
    if set(b.formats) != linears or any(f not in ("qdq", "matmulnbits") for f in b.formats.values()):
        raise _corrupt(f"backbone.formats {b.formats} must give qdq or matmulnbits for each integer precision of "
                       f"the linears ({', '.join(sorted(linears)) or 'none'})")
    graphs, seen, refs = set(b.graphs()), set(), []
    for graph, data in b.external_data.items():
        if graph not in graphs:
            raise _corrupt(f"backbone.external_data names {graph!r}, which is not a backbone graph")
        for i, rel in enumerate(data):
            where = f"backbone.external_data[{graph!r}][{i}]"
            check_relative(rel, f"manifest.json: {where}")
            if rel.rpartition("/")[0] != graph.rpartition("/")[0] or rel in graphs or rel in seen:
                raise _corrupt(f"{where} is {rel!r}: external data lies beside its own graph, one graph per file")
            seen.add(rel)
            refs.append((where, rel))
    return refs


def check_confined(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest lists resolves inside the bundle (no symbolic link out of it):
    writers check this before they change or delete anything."""
    for rel in manifest.files:
        resolve(bundle, rel, "manifest.json: files entry")


def verify_file(bundle: Path, manifest: Listing, rel: str) -> Path:
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


class Listing(Protocol):
    """Anything that lists bundle files with their sizes and sha256 (a manifest of any schema)."""

    files: dict[str, FileEntry]


def file_entry(manifest: Listing, rel: str) -> FileEntry:
    entry = manifest.files.get(rel)
    if entry is None:
        raise BundleError(f"manifest.json lists no file {rel}", "re-export the bundle")
    return entry


def check_bytes(bundle: Path, manifest: Listing, rel: str, data: bytes) -> bytes:
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


def read_verified(bundle: Path, manifest: Listing, rel: str) -> bytes:
    """Read a bundle file once, checking its size and sha256; the bytes go straight to ORT."""
    file_entry(manifest, rel)
    data = resolve_file(bundle, rel).read_bytes()
    return check_bytes(bundle, manifest, rel, data)


def bundle_path(bundle: Path, rel: str) -> Path:
    """Where ``rel`` lives, confined to the bundle (for files about to be written or read later)."""
    return resolve(bundle, rel)
