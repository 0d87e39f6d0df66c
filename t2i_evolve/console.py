"""What the command line prints through: one rich console, plain lines and JSON lines (shared by its modules)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

out = Console(emoji=False)  # a path like runs/lr:100: is printed as it is, not with an emoji
if not out.is_terminal:  # a log file or a pipe: rich's 80 columns cut a table's titles and cells to "sha…"
    out.width = 160


def say(text: str) -> None:
    """A plain line on stdout: never wrapped (it stays one greppable line when piped) and never read as rich
    markup (a path like `runs/exp[lr=1e-3]` would lose its brackets, and `[/x]` would raise)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def print_json(data) -> None:
    """One JSON line on stdout (what `--json` prints)."""
    sys.stdout.write(json.dumps(data) + "\n")


def named_folder(text: str) -> Path:
    """A folder argument a command writes into, as typed: an empty one is refused (`Path("")` is the current
    folder, which a quoted variable left unset would otherwise fill with a model or a ledger)."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a folder (. for this one)")
    return Path(text)
