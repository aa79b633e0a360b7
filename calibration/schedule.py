"""Retention ratios r(l): how many of a token's selected experts stay at high precision in layer l.

Definitions shared with the runtime:

* **Retention** r in (0, 1] is the fraction of a token's k selected experts that are *critical*
  (highest gate scores first) and run at high precision; the others run at a lower precision or
  are skipped. It is rounded per token to a whole number of experts exactly as the runtime does
  (``runtime/policy.py``, ``tier_of``): never rounded up, and the most important expert always
  stays critical, ``kept_per_token(r, k) = max(1, floor(r * k))``. With top-2, any r < 1 keeps
  one expert and r = 1 keeps both. r = 0 (keep none, every selected expert lowered) exists only
  as calibration's harshest sensitivity variant; the runtime never does it. The *effective*
  retention is ``kept / k``.
* **Cosine decay** (the paper's schedule), shallow layers keep more:
  ``r(l) = r_min + (r_max - r_min) * (1 + cos(pi * l / (L - 1))) / 2`` for l = 0..L-1, so
  r(0) = r_max and r(L-1) = r_min (a single layer gets r_max).
* **Recommended r(l)** for a loss budget: the loss of lowering layer l alone at retention r,
  ``loss_l(r)``, is measured at a few effective retentions (always 0, 1/k and 1, where
  loss_l(1) = 0). Assuming the losses of single layers add up, each layer gets an equal share
  ``target / L`` and r(l) is the smallest measured retention r > 0 (one the runtime can run) with
  ``loss_l(r) <= target / L``; r = 1 always qualifies.
* **Predicted loss** of a schedule: ``sum_l loss_l(effective r(l))``, linear between measured points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from dymoe.runtime.policy import cosine_retention, critical_count


def kept_per_token(r: float, k: int) -> int:
    """Experts per token kept at high precision for retention ``r`` and top-``k`` routing: the
    runtime's critical count, and 0 for calibration's harshest variant r = 0."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"retention {r} outside [0, 1]")
    return 0 if r == 0.0 else critical_count(r, k)


def effective_retention(r: float, k: int) -> float:
    return kept_per_token(r, k) / k


def retention_grid(ratios: Iterable[float], k: int) -> list[float]:
    """Effective retentions to measure besides 0 and 1: 1/k (the least the runtime keeps) and
    what ``ratios`` round to; distinct, ascending, below 1."""
    kept = {1} | {kept_per_token(r, k) for r in ratios if r > 0}
    return [j / k for j in sorted(kept) if j < k]


def cosine_schedule(num_layers: int, r_max: float, r_min: float) -> list[float]:
    """The runtime's cosine schedule (``runtime.policy.cosine_retention``) for every layer."""
    if num_layers < 1:
        raise ValueError("num_layers must be at least 1")
    return [cosine_retention(layer, num_layers, r_max, r_min) for layer in range(num_layers)]


def _points(losses: Mapping[float, float]) -> list[tuple[float, float]]:
    pts = dict(losses)
    pts.setdefault(1.0, 0.0)
    if 0.0 not in pts:
        raise ValueError("the loss at retention 0 (every selected expert lowered) is required")
    return sorted(pts.items())


def recommend(losses: Sequence[Mapping[float, float]], target: float) -> list[float]:
    """Per layer, the smallest measured retention whose loss fits the layer's equal share of ``target``."""
    if not losses:
        return []
    budget = target / len(losses)
    return [next(r for r, loss in _points(layer) if r > 0 and (loss <= budget or r == 1.0)) for layer in losses]


def loss_at(losses: Mapping[float, float], r: float) -> float:
    """``losses`` linearly interpolated at retention ``r``."""
    pts = _points(losses)
    for (r0, l0), (r1, l1) in zip(pts, pts[1:], strict=False):
        if r0 <= r <= r1:
            return l0 if r1 == r0 else l0 + (l1 - l0) * (r - r0) / (r1 - r0)
    raise ValueError(f"retention {r} outside [0, 1]")


def predicted_loss(losses: Sequence[Mapping[float, float]], schedule: Sequence[float], k: int) -> float:
    """Summed per-layer loss of running ``schedule`` (each r rounded per token as the runtime does)."""
    if len(losses) != len(schedule):
        raise ValueError("one retention per layer is needed")
    return float(sum(loss_at(layer, effective_retention(r, k)) for layer, r in zip(losses, schedule, strict=True)))
