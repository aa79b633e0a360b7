"""Calibration's expert sessions: the runtime's ``ExpertSessions`` with every expert at the
reference precision (the bundle's highest) loaded up front. Lower precisions load per layer when
first asked for and are dropped with ``drop``, so the sensitivity sweep holds at most one
layer's lower-precision copies besides the reference. The sessions are the runtime's own, so
calibration measures what ``dymoe run`` computes.
"""

from __future__ import annotations

from dymoe.bundle.progress import ProgressFn
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import ExpertSessions


class ExpertBank(ExpertSessions):
    def __init__(self, bundle: Bundle, progress: ProgressFn | None = None) -> None:
        super().__init__(bundle)
        self.reference = bundle.precisions[0]
        self.load_all(self.reference, progress)
