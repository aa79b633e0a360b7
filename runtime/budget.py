"""``--budget``: bytes for resident expert engines, as a size or a share of the bundle."""

from __future__ import annotations

import re

from dymoe.bundle.errors import InputError

_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str, all_experts_bytes: int) -> int:
    """``"600MiB"``, ``"1.5GB"``, ``"800M"`` or ``"30%"`` (of ``all_experts_bytes``: every expert
    resident at the bundle's highest precision)."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise InputError(f"--budget {text!r}: a percentage must be in (0, 100]", "for example --budget 25%")
        return int(all_experts_bytes * pct / 100)
    m = _SIZE.match(t)
    if m and not m.group(2):  # "25" is too easily meant as 25 % or 25 GB to be read as bytes
        raise InputError(f"--budget {text!r} has no unit",
                         f"write {m.group(1)}%, {m.group(1)}MiB or {m.group(1)}GB (or {m.group(1)}B for bytes)")
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"--budget {text!r} is not a size", "use e.g. 600MiB, 1.5GB or 25%")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
