"""What the runtime takes from a bundle's calibration: the calibrated depth schedule r(l) and
per-expert priors for importance-aware eviction and pinning.

* r(l): ``schedule.recommended[low]``, the smallest retention per layer that kept the measured
  loss of running the non-critical experts at ``low`` within the budget (``low`` is the lowest
  step of the runtime's ladder: a precision, or "skip"; default the bundle's lowest precision).
  Calibration keeps critical experts at the bundle's highest precision; a ladder whose top is
  lower adds that precision's error on top.
* priors: ``{(layer, expert): gate_share * num_experts}``, so 1.0 is an average expert.
"""

from __future__ import annotations

from dymoe.errors import BundleError
from dymoe.runtime.bundle import Bundle

from .schema import Calibration, read_calibration


def load_calibration(bundle: Bundle) -> Calibration | None:
    """The bundle's checked calibration, or None when it has not been calibrated."""
    if not bundle.manifest.calibration:
        return None
    cal = read_calibration(bundle.path, bundle.manifest)
    if cal.bundle.source_fingerprint_sha256 != bundle.manifest.source.fingerprint_sha256:
        raise BundleError(f"{bundle.path / bundle.manifest.calibration} was measured on another export",
                          "rerun dymoe calibrate on this bundle")
    return cal


def priors_of(cal: Calibration) -> dict[tuple[int, int], float]:
    n = cal.bundle.num_experts
    return {(layer.layer, e.expert): e.gate_share * n for layer in cal.importance for e in layer.experts}


def retention_of(cal: Calibration, low: str | None = None) -> list[float] | None:
    if cal.schedule is None:
        return None
    modes = cal.settings.modes
    low = low or next((m for m in reversed(modes) if m != "skip"), None)
    if low not in cal.schedule.recommended:
        raise BundleError(f"calibration has no recommended schedule for {low!r} (it has "
                          f"{', '.join(cal.schedule.recommended) or 'none'})", "rerun dymoe calibrate")
    return list(cal.schedule.recommended[low])


def load_priors(bundle: Bundle, low: str | None = None) -> tuple[list[float] | None, dict | None]:
    """``(r(l) or None, priors or None)`` from the bundle's calibration; both None if uncalibrated."""
    cal = load_calibration(bundle)
    if cal is None:
        return None, None
    return retention_of(cal, low), priors_of(cal)
