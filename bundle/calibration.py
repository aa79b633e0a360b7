"""``calibration.json``: what ``dymoe calibrate`` measured, the contract the runtime reads.

Deterministic by construction: no timestamps or timings, every float rounded to
``FLOAT_DIGITS`` significant digits, keys sorted. The reader is strict (the manifest's
``from_dict``: unknown or missing fields are errors naming the field) and checks the file's
sha256 against manifest.json.

Conventions: layers and experts are 0-based; "share" of an expert is its fraction of the layer's
routing assignments (tokens x k), "gate share" its fraction of the layer's gate mass; KL is in
nats per position; a retention of 0 means every selected expert of the layer was lowered.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dymoe.bundle.errors import BundleError
from dymoe.bundle.manifest import Manifest, read_verified
from dymoe.bundle.naming import CALIBRATION_NAME
from dymoe.bundle.paths import check_relative
from dymoe.bundle.precisions import SKIP
from dymoe.bundle.strict import from_dict

FLOAT_DIGITS = 6  # significant digits of every float in calibration.json

SCHEMA_VERSION = 1


@dataclass
class BundleRef:
    source_fingerprint_sha256: str  # manifest.source.fingerprint_sha256 of the bundle measured
    model_type: str
    num_layers: int
    num_experts: int
    top_k: int


@dataclass
class DataSource:
    name: str
    bytes: int
    sha256: str
    documents: int


@dataclass
class Settings:
    samples: int  # windows in the reference pass (importance, predictability)
    sensitivity_samples: int  # of those, rerun per sensitivity variant (0: sensitivity off)
    seq_len: int
    seed: int
    data: list[DataSource]
    data_tokens: int  # tokens in the whole tokenised data
    windows_available: int
    reference_precision: str
    modes: list[str]  # lower precisions measured, then "skip"
    heavy_hitter_fraction: float
    critical_fraction: float  # as an effective retention (rounded per token)
    retentions: list[float]  # effective retentions measured besides 0
    top_share_fraction: float
    coverage_mass: float
    percentiles: list[float]
    recall_ks: list[int]
    target_kl: float
    cosine_r_max: float
    cosine_r_min: float


@dataclass
class ExpertImportance:
    expert: int
    tokens: int  # tokens routed to the expert
    share: float  # tokens / (layer tokens * top_k)
    gate_mass: float  # sum of its routing weights
    gate_share: float  # gate_mass / layer gate mass
    weight_mean: float  # routing weight when selected (0 if never selected)
    weight_percentiles: list[float]  # at settings.percentiles
    heavy_hitters: int  # heavy-hitter tokens routed to it
    output_contribution: float  # mean ||weight * expert output||_2 over its tokens


@dataclass
class Skew:  # of the experts' gate mass
    gini: float
    entropy: float  # normalised: 1 = even
    top_share: float  # share held by the top settings.top_share_fraction of experts
    coverage_count: int  # experts needed for settings.coverage_mass of the mass


@dataclass
class LayerImportance:
    layer: int
    tokens: int
    heavy_hitter_tokens: int
    skew: Skew
    experts: list[ExpertImportance]


@dataclass
class SensitivityEntry:
    layer: int
    mode: str
    retention: float
    kl: float  # mean KL(P_ref || P) per position
    nll: float
    ppl: float
    ppl_delta: float  # ppl - reference ppl


@dataclass
class Sensitivity:
    reference_nll: float
    reference_ppl: float
    positions: int  # positions the KL averages over
    scored_tokens: int  # tokens the perplexity scores
    entries: list[SensitivityEntry]


@dataclass
class Prediction:
    layer: int  # whose selection is predicted
    distance: int  # from layer - distance
    source: str  # "router_input" | "attn_input"
    k: int
    recall: float


@dataclass
class Schedule:
    target_kl: float
    layer_budget_kl: float  # target_kl / num_layers
    recommended: dict[str, list[float]]  # mode -> r(l)
    recommended_kl: dict[str, float]  # mode -> predicted summed KL
    cosine: list[float]
    cosine_kl: dict[str, float]


@dataclass
class ExpertInputs:
    """Where ``--collect-inputs`` put each expert's routed inputs (read with ``calibration.inputs``)."""

    cap: int  # at most this many rows kept per (layer, expert), drawn by reservoir sampling
    seed: int  # of the reservoir draws (settings.seed)
    dtype: str  # of the stored rows: "F16"
    files: list[str]  # per layer, the bundle-relative safetensors file (listed in manifest.json)
    seen: list[list[int]]  # [layer][expert] rows offered: the tokens routed to the expert
    kept: list[list[int]]  # [layer][expert] rows stored: min(seen, cap)


@dataclass
class Calibration:
    schema_version: int
    dymoe_version: str
    bundle: BundleRef
    settings: Settings
    importance: list[LayerImportance]
    sensitivity: Sensitivity | None  # None when run with sensitivity off
    prediction: list[Prediction]
    schedule: Schedule | None
    expert_inputs: ExpertInputs | None = None  # None unless run with --collect-inputs

    def to_json(self) -> str:
        return json.dumps(_rounded(dataclasses.asdict(self)), indent=1, sort_keys=True, allow_nan=False) + "\n"

    def entry(self, layer: int, mode: str, retention: float) -> SensitivityEntry | None:
        for e in self.sensitivity.entries if self.sensitivity else []:
            if e.layer == layer and e.mode == mode and abs(e.retention - retention) < 1e-9:
                return e
        return None

    def recall(self, layer: int, distance: int, source: str, k: int) -> float | None:
        for p in self.prediction:
            if (p.layer, p.distance, p.source, p.k) == (layer, distance, source, k):
                return p.recall
        return None


def round_sig(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant digits (the form every calibration.json float takes)."""
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    if x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def _rounded(obj):
    if isinstance(obj, float):
        return round_sig(obj, FLOAT_DIGITS)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def parse(text: str, label: str = CALIBRATION_NAME) -> Calibration:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{label} is not valid JSON ({e})", "rerun dymoe calibrate") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{label}: schema_version {version!r}, this dymoe reads {SCHEMA_VERSION}",
                          "rerun dymoe calibrate with this dymoe version")
    try:
        return from_dict(Calibration, data, label=label)
    except BundleError as e:
        raise BundleError(e.message, "rerun dymoe calibrate with this dymoe version") from None


def read_calibration(bundle: Path, manifest: Manifest) -> Calibration:
    """The bundle's calibration, checked against the sha256 manifest.json records for it."""
    if not manifest.calibration:
        raise BundleError(f"bundle {bundle} has no calibration",
                          "run: dymoe calibrate BUNDLE --data TEXT_FILE")
    data = read_verified(bundle, manifest, manifest.calibration)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{Path(bundle) / manifest.calibration} is not UTF-8", "rerun dymoe calibrate") from None
    cal = parse(text, str(Path(bundle) / manifest.calibration))
    for i, rel in enumerate(cal.expert_inputs.files if cal.expert_inputs else []):
        check_relative(rel, f"calibration.json: expert_inputs.files[{i}]")
        if rel not in manifest.files:
            raise BundleError(f"calibration.json names input file {rel!r}, which manifest.json does not list",
                              "rerun: dymoe calibrate BUNDLE --data TEXT --collect-inputs")
    return cal


def load_calibration(bundle: Path, manifest: Manifest) -> Calibration | None:
    """The bundle's checked calibration, or None when it has not been calibrated."""
    if not manifest.calibration:
        return None
    cal = read_calibration(bundle, manifest)
    if cal.bundle.source_fingerprint_sha256 != manifest.source.fingerprint_sha256:
        raise BundleError(f"{Path(bundle) / manifest.calibration} was measured on another export",
                          "rerun dymoe calibrate on this bundle")
    return cal


def priors_of(cal: Calibration) -> dict[tuple[int, int], float]:
    """What the runtime's eviction and pinning take from calibration: per (layer, expert), its share
    of the layer's gate mass times the number of experts (1.0 is an average expert)."""
    n = cal.bundle.num_experts
    return {(layer.layer, e.expert): e.gate_share * n for layer in cal.importance for e in layer.experts}


def retention_of(cal: Calibration, low: str | None = None) -> list[float] | None:
    """The calibrated depth schedule r(l): ``schedule.recommended[low]``, the smallest retention per
    layer that kept the measured loss of running the non-critical experts at ``low`` within the
    budget (``low``: the lowest step of the runtime's ladder; default the bundle's lowest precision).
    Calibration keeps critical experts at the bundle's highest precision; a ladder whose top is lower
    adds that precision's error on top. None when the calibration measured no sensitivity."""
    if cal.schedule is None:
        return None
    low = low or next((m for m in reversed(cal.settings.modes) if m != SKIP), None)
    if low not in cal.schedule.recommended:
        raise BundleError(f"calibration has no recommended schedule for {low!r} (it has "
                          f"{', '.join(cal.schedule.recommended) or 'none'})", "rerun dymoe calibrate")
    return list(cal.schedule.recommended[low])
