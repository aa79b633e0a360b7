"""Plots as files: matplotlib is an optional extra (``dymoe[report]``), imported only when a plot
is drawn, with the non-interactive Agg backend; PNGs are written atomically like every other file."""

from __future__ import annotations

import io
from pathlib import Path

from dymoe.bundle.errors import DymoeError
from dymoe.bundle.fsutil import atomic_write_bytes


def require_matplotlib():
    """``matplotlib.pyplot``, or a clean error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise DymoeError("plots need matplotlib, which is not installed",
                         "pip install 'dymoe[report]' (or leave out the plots: --no-report / no --plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (no timestamp in the file, so reruns are byte-identical) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    require_matplotlib().close(fig)
    return Path(path)
