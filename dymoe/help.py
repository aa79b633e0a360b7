"""How a command's ``--help`` reads, at any terminal width.

Typer's rich help prints every line break of a docstring as it is, so prose wrapped in the
source breaks mid-sentence on screen, and its usage line writes arguments as ``{model}``. Here
prose paragraphs are joined into one line each (the terminal wraps them), example lines (those
indented in the docstring) are kept as written, and usage names arguments as ``MODEL`` and
``[PATH]...`` as POSIX usage lines do.
"""

from __future__ import annotations

import inspect

from typer.core import TyperCommand


def reflow(doc: str | None) -> str | None:
    """Join each prose paragraph of ``doc`` into one line; keep indented lines (examples) whole."""
    if doc is None:
        return None
    paragraphs = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines, prose = [], []
        for line in para.splitlines():
            if line.startswith(" "):  # an example: a command line must stay one line
                if prose:
                    lines.append(" ".join(prose))
                    prose = []
                lines.append(line)
            else:
                prose.append(line.strip())
        if prose:
            lines.append(" ".join(prose))
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


class Command(TyperCommand):
    """A dymoe subcommand: reflowed help, and POSIX-style argument names in its usage line."""

    def __init__(self, *args, help: str | None = None, **kwargs) -> None:
        super().__init__(*args, help=reflow(help), **kwargs)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":  # Typer's arguments are not click.Argument instances
                continue
            name = (param.metavar or param.name or "").strip("[]. ").upper()
            shown = name if param.required else f"[{name}]"
            pieces.append(shown + ("..." if param.nargs != 1 else ""))
        return pieces
