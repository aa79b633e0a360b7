"""Calibration settings and their defaults, declared once (the CLI shows them in --help; this module
imports nothing heavy).

Defaults are sized so that the shipped demo model (7 layers, 16 experts, top-2, hidden 192)
calibrates in about a minute on 2 cores: the reference pass runs once over ``samples`` windows,
and the sensitivity sweep runs once over ``sensitivity_samples`` of them per (layer, lower
precision or skip, retention ratio): 7 x 4 x 2 = 56 passes for the demo model.
"""

from __future__ import annotations

from dataclasses import dataclass

from dymoe.bundle.errors import InputError

SAMPLES = 64  # token windows drawn from the data: importance and predictability (one pass)
SENSITIVITY_SAMPLES = 16  # the first of those drawn: each sensitivity variant runs over them again
SEQ_LEN = 128  # tokens per window; each window is one prefill from an empty KV cache
SEED = 0  # chooses which windows are drawn
# Heavy hitters: per layer and window, the tokens whose accumulated attention (attn_colsum: attention
# probabilities summed over heads and query rows) lies in the top HEAVY_HITTER_FRACTION of the window
# (ceil(fraction * tokens), at least one; ties go to the earlier token).
HEAVY_HITTER_FRACTION = 0.1
# Critical experts: per token, the top CRITICAL_FRACTION of its k selected experts by gate score stay at
# the reference precision; the rest are lowered or skipped (rounding as the runtime's:
# schedule.kept_per_token, so with top-2 this keeps 1 of 2).
CRITICAL_FRACTION = 0.5
# Retention ratios at which the non-critical sensitivity is measured, for the recommended r(l); each is
# rounded per token to a whole number of kept experts, 1/k is always added, duplicates and 1 dropped.
# With top-2 that is just r = 0.5 (keep 1 of 2).
RETENTIONS = (0.25, 0.5, 0.75)
TOP_SHARE_FRACTION = 0.2  # skew: share of the gate mass held by the top 20 % of experts
COVERAGE_MASS = 0.8  # skew: how many experts cover 80 % of the gate mass
PERCENTILES = (10.0, 50.0, 90.0)  # of the routing weight, when selected
# Recommended r(l): the smallest retention ratio per layer whose measured mean KL stays within
# TARGET_KL / num_layers (losses of single layers are assumed to add up).
TARGET_KL = 0.05
# The paper's schedule for comparison: r(l) = r_min + (r_max - r_min) * (1 + cos(pi * l / (L - 1))) / 2.
COSINE_R_MAX = 1.0
COSINE_R_MIN = 0.5
# --collect-inputs: at most this many routed hidden states (rows) kept per (layer, expert), drawn
# uniformly from all the expert received (reservoir sampling), for GPTQ's Hessian X^T X. GPTQ wants
# a few times the expert's hidden size in rows; memory and disk are layers x experts x N x hidden x 2 bytes
# (fp16), e.g. 7 x 16 x 1024 x 192 x 2 = 42 MiB for the demo model.
INPUTS_PER_EXPERT = 1024


@dataclass(frozen=True)
class CalibrationOptions:
    samples: int = SAMPLES
    sensitivity_samples: int = SENSITIVITY_SAMPLES
    seq_len: int = SEQ_LEN
    seed: int = SEED
    heavy_hitter_fraction: float = HEAVY_HITTER_FRACTION
    critical_fraction: float = CRITICAL_FRACTION
    retentions: tuple[float, ...] = RETENTIONS
    top_share_fraction: float = TOP_SHARE_FRACTION
    coverage_mass: float = COVERAGE_MASS
    percentiles: tuple[float, ...] = PERCENTILES
    target_kl: float = TARGET_KL
    cosine_r_max: float = COSINE_R_MAX
    cosine_r_min: float = COSINE_R_MIN
    sensitivity: bool = True  # False: importance and predictability only (one pass)
    collect_inputs: bool = False  # keep each expert's routed inputs (calibration-inputs/) for GPTQ
    inputs_per_expert: int = INPUTS_PER_EXPERT

    def validate(self) -> CalibrationOptions:
        if self.samples < 1:
            raise InputError(f"--samples {self.samples} must be at least 1", f"for example --samples {SAMPLES}")
        if self.sensitivity_samples < 1:
            raise InputError(f"--sensitivity-samples {self.sensitivity_samples} must be at least 1",
                             "for example --sensitivity-samples 4, or --no-sensitivity to skip that pass")
        if self.seed < 0:
            raise InputError(f"--seed {self.seed} must be a non-negative integer", "for example --seed 0")
        if self.seq_len < 2:
            raise InputError(f"--seq-len {self.seq_len} must be at least 2 (one token predicts the next)",
                             f"for example --seq-len {SEQ_LEN}")
        if self.inputs_per_expert < 1:
            raise InputError(f"--inputs-per-expert {self.inputs_per_expert} must be at least 1",
                             f"use the default of {INPUTS_PER_EXPERT}, or leave out --collect-inputs")
        fractions = {"heavy-hitter fraction": self.heavy_hitter_fraction,
                     "critical fraction": self.critical_fraction, "top-share fraction": self.top_share_fraction,
                     "coverage mass": self.coverage_mass, "cosine r_max": self.cosine_r_max,
                     "cosine r_min": self.cosine_r_min, **{f"retention {r}": r for r in self.retentions}}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} {value} must lie in [0, 1]", "a share: use a value from 0 to 1")
        if self.target_kl < 0:
            raise InputError(f"--target-kl {self.target_kl} must not be negative",
                             f"for example --target-kl {TARGET_KL}")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise InputError("percentiles must lie in [0, 100]", "use percentiles such as 10, 50, 90")
        return self
