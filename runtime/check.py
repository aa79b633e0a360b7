"""``dymoe check``: per precision of a bundle, which provider can run its expert graphs and why not,
by reading the graphs (checksum-verified) and judging them with ``targets/rules.py``.

Every graph of a precision is built by the same code, so by default one expert per MoE layer is
read (``every=True`` reads them all); a provider can run a precision only if it can run every graph
read, and the reasons of all of them are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dymoe.bundle.manifest import read_manifest, read_verified
from dymoe.bundle.progress import Counter, ProgressFn
from dymoe.targets.devices import DeviceProfile
from dymoe.targets.rules import CUDA_NBITS, Verdict, verdicts

from .graph_facts import graph_facts

PROVIDERS = ("tensorrt", "cuda", "cpu")


@dataclass
class PrecisionCheck:
    precision: str
    format: str
    graphs: int  # expert graphs read
    blocks: list[int]  # quantization block sizes found
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # provider -> verdict over every graph read

    @property
    def best(self) -> str | None:
        """The first provider of tensorrt, cuda, cpu that runs it."""
        return next((p for p in PROVIDERS if self.verdicts[p].ok), None)


def _merge(provider: str, vs: list[Verdict]) -> Verdict:
    ok = all(v.ok for v in vs)
    pick = (lambda v: v.notes) if ok else (lambda v: v.reasons)
    said = tuple(dict.fromkeys(r for v in vs for r in pick(v)))
    return Verdict(provider, ok, () if ok else said, said if ok else ())


def check_bundle(bundle: Path, profile: DeviceProfile | None = None, every: bool = False,
                 progress: ProgressFn | None = None) -> list[PrecisionCheck]:
    m = read_manifest(bundle)
    spec = m.model
    cuda_bits = tuple(profile.capabilities.cuda_matmulnbits_bits) if profile else CUDA_NBITS
    trt = profile.software.tensorrt if profile else None
    experts = m.experts if every else [m.expert(layer, 0) for layer in spec.moe_layers]
    counter = Counter(progress, "checking expert graphs", len(experts) * len(m.quantization.precisions))
    out = []
    for p in m.quantization.precisions:
        per: dict[str, list[Verdict]] = {k: [] for k in PROVIDERS}
        blocks: set[int] = set()
        for entry in experts:
            model = onnx.load_model_from_string(read_verified(bundle, m, entry.variants[p].path))
            facts = graph_facts(model)
            del model
            blocks |= {w.block_size for w in facts.weights if w.block_size}
            for v in verdicts(facts, cuda_bits, trt):
                per[v.provider].append(v)
            counter.tick()
        out.append(PrecisionCheck(p, m.quantization.formats[p], len(experts), sorted(blocks),
                                  {k: _merge(k, vs) for k, vs in per.items()}))
    return out


def report_json(checks: list[PrecisionCheck], profile: DeviceProfile | None) -> dict:
    return {"target": profile.name if profile else None,
            "precisions": [{"precision": c.precision, "format": c.format, "graphs": c.graphs, "blocks": c.blocks,
                            "best": c.best,
                            **{k: {"ok": v.ok, "reasons": list(v.reasons), "notes": list(v.notes)}
                               for k, v in c.verdicts.items()}} for c in checks]}
