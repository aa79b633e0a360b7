"""``dymoe info BUNDLE --plan --memory 16GB``: what fits in a device's memory, before anything runs.

Memory is split, in this order, into the backbone (resident, at the precision it was exported at),
the KV cache at a context length (float32), a runtime reserve (ONNX Runtime, its arenas, the CUDA
context) and what is left: the expert budget. For each expert precision of the bundle the plan says
how many experts that budget holds and how many bytes a token then reads from storage.

The reading model is deliberately simple and stated with the numbers: routing is taken as uniform
and independent, so a steady-state cache holding a share ``h`` of all experts hits with probability
``h``, and each token reads ``(1 - h) * top_k * moe_layers`` experts. Real routing is skewed (a
calibrated bundle's hottest experts take most of the gate mass), so this is an upper bound on what
an LRU or priority cache reads; ``dymoe bench`` measures the real figure.

Everything here is a pure function of a :class:`PlanFacts` (made from a manifest, or extrapolated
for a model too large to export whole); the CLI only prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dymoe.bundle.errors import InputError
from dymoe.bundle.manifest import Manifest

from .device_memory import RUNTIME_RESERVE, backbone_bytes

DEFAULT_CONTEXT = 4096  # tokens of KV cache a plan reserves unless told (capped at the model's context)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str, option: str = "--memory") -> int:
    """``16GB`` (10^9) or ``16GiB`` (2^30), also kB/MB/TB and KiB/MiB/TiB; a bare number or an
    ambiguous unit (``16G``) is refused: a memory size off by 7 % is a plan that does not fit."""
    m = _SIZE.match(text or "")
    if not m or m.group(2).lower() not in _UNITS:
        unit = m.group(2) if m else ""
        what = "has no unit" if m and not unit else f"has an unknown unit {unit!r}" if m else "is not a size"
        raise InputError(f"{option} {text!r} {what}",
                         f"give a number with a unit: {option} 16GB (10^9 bytes) or {option} 16GiB (2^30 bytes)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise InputError(f"{option} {text!r} must be more than 0 bytes", f"for example {option} 16GB or {option} 16GiB")
    return int(value)


@dataclass(frozen=True)
class PlanFacts:
    """What a plan needs to know of a bundle."""

    model: str
    backbone_precision: str
    backbone_bytes: int  # resident (device_memory.backbone_bytes)
    kv_bytes_per_token: int
    max_context: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    resident_bytes: dict[str, int]  # per expert precision: what one resident expert costs
    file_bytes: dict[str, int]  # per expert precision: what loading one expert reads (mean file size)

    @property
    def experts(self) -> int:
        return self.moe_layers * self.experts_per_layer


def facts_of(manifest: Manifest, device_costs: dict[str, int] | None = None) -> PlanFacts:
    """A bundle's facts. ``device_costs`` (per precision, ``device_memory.device_costs``) prices an
    expert on a GPU, and the backbone's quantized weights as stored; without them (the CPU) an expert
    costs its mean file size, twice for a ``float`` fp16 variant (ONNX Runtime folds its Cast into a
    float32 copy), and the backbone's quantized weights their prepacked size."""
    q, s = manifest.quantization, manifest.model
    files = {p: round(sum(manifest.files[e.variants[p].path].bytes for e in manifest.experts) / len(manifest.experts))
             for p in q.precisions}
    resident = device_costs or {p: b * (2 if p == "fp16" and q.formats[p] == "float" else 1) for p, b in files.items()}
    return PlanFacts(model=f"{s.model_type} ({manifest.source.model})", backbone_precision=manifest.backbone.precision,
                     backbone_bytes=backbone_bytes(manifest, prepacked=device_costs is None),
                     kv_bytes_per_token=s.kv_bytes_per_token(),
                     max_context=s.max_position_embeddings, moe_layers=len(s.moe_layers),
                     experts_per_layer=s.num_experts, top_k=s.top_k, resident_bytes=dict(resident), file_bytes=files)


@dataclass(frozen=True)
class PrecisionRow:
    precision: str
    expert_bytes: int  # one resident expert
    experts_fit: int  # in the expert budget (at most all of them)
    share: float  # experts_fit / all experts: the hit rate under uniform routing
    read_per_token: int  # bytes read from storage per token, uniform routing
    read_ms_per_token: float | None  # at the device's storage speed, when known


@dataclass(frozen=True)
class Plan:
    facts: PlanFacts
    memory: int
    context: int
    kv_bytes: int
    reserve: int
    expert_budget: int  # negative: the backbone, KV cache and reserve alone do not fit
    rows: list[PrecisionRow]

    @property
    def fits(self) -> bool:
        """Whether a run can start: the budget holds one layer's top-k at the cheapest precision."""
        cheapest = min(self.facts.resident_bytes.values())
        return self.expert_budget >= self.facts.top_k * cheapest


def make_plan(facts: PlanFacts, memory: int, context: int | None = None, reserve: int = RUNTIME_RESERVE,
              storage_mb_per_s: float | None = None) -> Plan:
    """Split ``memory`` bytes; ``context`` tokens of KV cache (default :data:`DEFAULT_CONTEXT`, at most
    the model's); ``storage_mb_per_s`` turns bytes read into milliseconds."""
    if context is None:
        context = min(DEFAULT_CONTEXT, facts.max_context)
    if not 1 <= context <= facts.max_context:
        raise InputError(f"--context {context} is outside 1..{facts.max_context}, the model's context",
                         f"choose at most {facts.max_context} tokens")
    kv = facts.kv_bytes_per_token * context
    budget = memory - facts.backbone_bytes - kv - reserve
    rows = []
    for p, cost in facts.resident_bytes.items():
        fit = min(facts.experts, max(budget, 0) // cost)
        share = fit / facts.experts
        read = round((1 - share) * facts.top_k * facts.moe_layers * facts.file_bytes[p])
        ms = None if storage_mb_per_s is None else read / (storage_mb_per_s * 1e6) * 1e3
        rows.append(PrecisionRow(p, cost, fit, share, read, ms))
    return Plan(facts, memory, context, kv, reserve, budget, rows)
