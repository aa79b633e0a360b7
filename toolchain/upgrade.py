"""``dymoe upgrade``: bring a bundle written by an older dymoe (manifest schema 1, 2 or 3) to the
current format without re-exporting it.

Schema 3 bundles have today's graphs; their manifest only lacks how the backbone is stored (schema 4:
``backbone.precision``, ``embedding``, ``quantizer``, ``external_data``), which was always float32
and inline then, so upgrading one rewrites manifest.json alone, in one atomic write.

Schema 1/2 layer graphs returned router logits and left routing to the runtime; since schema 3
each layer graph makes its routing decision itself (the architecture's rule), a small router
graph per MoE layer serves the look-ahead, and the manifest describes the KV cache and the
architecture. The expert files are unchanged, so they are kept as they are; only the layer
graphs are rebuilt, from the weights inside the old ones (whose names the old exporter fixed),
by the architecture's current code.

Safe at every moment: the new graphs are written under new names, recorded in a journal;
manifest.json switches in one atomic write; only then are the old layer graphs deleted (the
journal names them, so a rerun after a crash finishes the cleanup).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dymoe.bundle.errors import BundleError
from dymoe.bundle.folder import remove_listed
from dymoe.bundle.fsutil import fsync_dir
from dymoe.bundle.journal import Journal, read_retired
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import (
    MANIFEST_ONLY_VERSIONS,
    OLD_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    Backbone,
    ExpertEntry,
    FileEntry,
    Manifest,
    Quantization,
    Source,
    check_manifest,
    read_json,
    read_manifest,
    read_verified,
)
from dymoe.bundle.progress import Counter, ProgressFn
from dymoe.bundle.strict import from_dict
from dymoe.bundle.version import __version__

from .archs import base, get_architecture
from .variants import write_model

JOURNAL = ".dymoe-upgrade.jsonl"
UPGRADABLE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # what schema 1/2 exported


@dataclass
class OldModelSpec:
    """manifest.json's ``model`` in schemas 1 and 2."""

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
    shared_intermediate_size: int
    shared_expert_gate: bool
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    qk_norm: str
    clip_qkv: float | None
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]


@dataclass
class OldBackbone:
    embed: str
    layers: list[str]
    head: str


@dataclass
class OldManifest:
    schema_version: int
    dymoe_version: str
    created_utc: str
    source: Source
    model: OldModelSpec
    quantization: Quantization
    tools: dict[str, str]
    tokenizer: list[str]
    backbone: OldBackbone
    experts: list[ExpertEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    calibration: str | None = None


def _config_of(s: OldModelSpec) -> dict:
    """The config.json the old spec was read from, as far as the architecture readers need it."""
    cfg = {"model_type": s.model_type, "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
           "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
           "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "num_experts_per_tok": s.top_k,
           "rms_norm_eps": s.rms_norm_eps, "rope_theta": s.rope_theta,
           "max_position_embeddings": s.max_position_embeddings, "tie_word_embeddings": s.tie_word_embeddings,
           "bos_token_id": s.bos_token_id, "eos_token_id": list(s.eos_token_ids),
           "norm_topk_prob": s.norm_topk_prob, "attention_bias": s.attention_bias}
    if s.model_type == "mixtral":
        cfg |= {"num_local_experts": s.num_experts, "intermediate_size": s.expert_intermediate_size,
                "sliding_window": s.sliding_window}
    elif s.model_type == "olmoe":
        cfg |= {"num_experts": s.num_experts, "intermediate_size": s.expert_intermediate_size, "clip_qkv": s.clip_qkv}
    else:
        cfg |= {"num_experts": s.num_experts, "moe_intermediate_size": s.expert_intermediate_size,
                "sliding_window": s.sliding_window}
        if s.model_type == "qwen2_moe":
            cfg |= {"shared_expert_intermediate_size": s.shared_intermediate_size, "qkv_bias": s.attention_bias,
                    "use_sliding_window": s.sliding_window is not None}
    return cfg


# the old exporter stored these as MatMul weights, [in, out]: the transpose of the canonical layout
_TRANSPOSED = ("q", "k", "v", "o", "router", "shared.gate", "shared.up", "shared.down", "shared_gate")
_KEPT = ("attn_norm", "ffn_norm", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")


def _tensors(model: onnx.ModelProto, rel: str) -> base.Tensors:
    """The canonical tensors of one old layer graph."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {name: np.ascontiguousarray(found[name].T) for name in _TRANSPOSED if name in found}
    out |= {name: found[name] for name in _KEPT if name in found}
    if not {"q", "k", "v", "o", "router", "attn_norm", "ffn_norm"} <= set(out):
        raise BundleError(f"{rel} is not a layer graph dymoe wrote", "re-export the bundle from its checkpoint")
    return out


def upgrade(bundle: Path, progress: ProgressFn | None = None) -> Manifest:
    """Rewrite an older bundle's layer graphs and manifest in the current format (a no-op, but
    for finishing an interrupted cleanup, when the bundle is current already)."""
    bundle = Path(bundle)
    read_json(bundle)  # clean errors for a missing or foreign folder before the lock file is made
    with bundle_lock(bundle, "upgrade"):
        data = read_json(bundle)
        version = data.get("schema_version")
        if version == SCHEMA_VERSION:
            m = read_manifest(bundle)
            remove_listed(bundle, [r for r in read_retired(bundle / JOURNAL) if r not in m.files])
            (bundle / JOURNAL).unlink(missing_ok=True)
            return m
        if version in MANIFEST_ONLY_VERSIONS:
            return _upgrade_manifest(bundle, data)
        if version not in OLD_SCHEMA_VERSIONS:
            raise BundleError(f"{bundle}: schema_version {version!r} is not one dymoe can upgrade",
                              "re-export the bundle from its checkpoint")
        return _upgrade_locked(bundle, from_dict(OldManifest, data), progress)


_SCHEMA3_BACKBONE = {"embed", "layers", "head", "routers"}


def _upgrade_manifest(bundle: Path, data: dict) -> Manifest:
    """Schema 3 -> 4: the backbone fields get what schema 3 always wrote (float32, inline)."""
    backbone = data.get("backbone")
    extra = sorted(set(backbone) - _SCHEMA3_BACKBONE) if isinstance(backbone, dict) else []
    if extra:
        raise BundleError(f"{bundle}/manifest.json: unknown field 'backbone.{extra[0]}' in a schema 3 manifest",
                          "the bundle is corrupt or was not written by dymoe; re-export it")
    m = from_dict(Manifest, {**data, "schema_version": SCHEMA_VERSION})
    check_manifest(m)
    m.tools = {**m.tools, "upgraded_by": __version__}
    m.write(bundle)  # the one atomic switch; no other file changes
    fsync_dir(bundle)
    return read_manifest(bundle)


def _upgrade_locked(bundle: Path, old: OldManifest, progress: ProgressFn | None) -> Manifest:
    if old.model.model_type not in UPGRADABLE:
        raise BundleError(f"{bundle} holds a {old.model.model_type} bundle, which no older dymoe wrote",
                          "re-export the bundle from its checkpoint")
    arch = get_architecture(old.model.model_type)
    settings = arch.read_config(_config_of(old.model))
    spec = arch.model_spec(settings)
    journal = Journal(bundle / JOURNAL, f"upgrade {old.source.fingerprint_sha256}", {})
    counter = Counter(progress, f"upgrade {spec.model_type} to schema {SCHEMA_VERSION}", spec.num_layers)
    files = dict(old.files)
    for rel in old.backbone.layers:
        files.pop(rel)
    layers, routers = [], []
    for layer, rel in enumerate(old.backbone.layers):
        t = _tensors(onnx.load_model_from_string(read_verified(bundle, old, rel)), rel)
        new = {f"backbone/layer_{layer:03d}.s{SCHEMA_VERSION}.onnx": arch.layer_graph(settings, t, layer),
               f"backbone/router_{layer:03d}.onnx": base.router_graph(settings.decoder, settings.routing, t, layer)}
        for path, model in new.items():
            entry = write_model(bundle, path, model)
            files[path] = FileEntry(entry["bytes"], entry["sha256"])
            journal.record({path: entry})
        layers.append(list(new)[0])
        routers.append(list(new)[1])
        counter.tick()
    for entry in old.experts:  # schema 1 did not record who quantized: it was always round-to-nearest
        for v in entry.variants.values():
            if old.schema_version == 1 and old.quantization.formats.get(v.precision) != "float":
                v.quantizer = "rtn"
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, dymoe_version=__version__, created_utc=old.created_utc, source=old.source,
        model=spec, quantization=old.quantization, tools={**old.tools, "upgraded_by": __version__},
        tokenizer=old.tokenizer, experts=old.experts, architecture=base.settings_json(settings),
        backbone=Backbone(embed=old.backbone.embed, layers=layers, head=old.backbone.head, routers=routers),
        files=dict(sorted(files.items())), calibration=old.calibration)
    journal.retire(list(old.backbone.layers))
    manifest.write(bundle)  # the one atomic switch
    fsync_dir(bundle)
    journal.close()
    remove_listed(bundle, list(old.backbone.layers))
    (bundle / JOURNAL).unlink(missing_ok=True)
    return read_manifest(bundle)
