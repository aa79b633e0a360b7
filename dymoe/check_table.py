"""The table of ``dymoe check``: per precision, which provider runs it and why not (rich lives only
in the CLI layer)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dymoe.runtime.check import PROVIDERS, PrecisionCheck


def print_check(checks: list[PrecisionCheck], title: str, console: Console) -> None:
    t = Table(title=title, show_lines=True)
    for col in ("precision", "format", "graphs", "blocks", "runs on", *PROVIDERS):
        t.add_column(col, justify="left" if col in PROVIDERS else "right", overflow="fold")
    for c in checks:
        t.add_row(c.precision, c.format, str(c.graphs), "/".join(map(str, c.blocks)) or "-", c.best or "nothing",
                  *(("[green]" if c.verdicts[p].ok else "[red]") + c.verdicts[p].text() + "[/]" for p in PROVIDERS))
    console.print(t)
