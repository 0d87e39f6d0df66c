"""`t2i-evolve ledger ...`: read a run folder's dataset ledger (counts, one record's history), export and import it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .console import named_folder, out, print_json, say
from .errors import UserError

ledger_app = typer.Typer(no_args_is_help=True, help="The dataset ledger of a run folder.")


def open_ledger(run_dir: Path):
    from .data import Ledger

    if not (run_dir / "ledger.sqlite").is_file():
        raise UserError(f"no ledger in {run_dir} (expected {run_dir / 'ledger.sqlite'})")
    return Ledger(run_dir, read_only=True)  # (read only: a colleague's run folder, say, that this user cannot write)


@ledger_app.command("stats")
def ledger_stats(run_dir: Path, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Counts of records (active, deleted), and of operations and calls (per caller) per round."""
    with open_ledger(run_dir) as ledger:  # (closed also on an error: no WAL files left in a colleague's folder)
        stats = ledger.stats()
    if as_json:
        print_json(stats)
        return
    _print_stats(run_dir, stats)


def _print_stats(run_dir: Path, stats: dict) -> None:
    """`Ledger.stats()` as a person reads it: a row per round of its operations and of each caller's requests."""
    records, interrupted = stats["records"], stats["interrupted_calls"]
    say(f"{run_dir}: {records['total']} records, {records['active']} active, {records['deleted']} deleted"
        + (f"; {interrupted} calls sent again after a crash (their replies lost with it: perhaps paid twice, "
           "counted once)" if interrupted else ""))
    ops = sorted({row["op"] for row in stats["ops"]})
    callers = sorted({row["caller"] for row in stats["calls"]})
    rounds = sorted({row["round"] for row in stats["ops"] + stats["calls"]}, key=lambda r: (r is None, r))

    def calls_cell(rows: list[dict]) -> str:
        sent, again, failed, price = (sum(row[key] or 0 for row in rows)
                                      for key in ("attempts", "interrupted", "failed", "price"))
        parts = ([f"{sent} sent"] + ([f"{again} again after a crash"] if again else [])
                 + ([f"{failed} failed"] if failed else []) + ([f"price {price:.6g}"] if price else []))
        return ", ".join(parts)

    table = Table("round", *ops, *(f"{escape(caller)} calls" for caller in callers),  # an id may hold '['
                  title="operations, and requests sent (each retry one; what budgets count) and failed, per round")
    for r in rounds:
        cells = [str(sum(row["count"] for row in stats["ops"] if (row["round"], row["op"]) == (r, op))) for op in ops]
        cells += [calls_cell([row for row in stats["calls"] if (row["round"], row["caller"]) == (r, caller)])
                  for caller in callers]
        table.add_row("-" if r is None else str(r), *cells)
    out.print(table)
    for what in ("generator", "skill"):
        counts = "; ".join(f"{name} " + ", ".join(f"{n} {status}" for status, n in by_status.items())
                           for name, by_status in stats[what + "s"].items())
        say(f"records by {what}: {counts}")
    say("(--json: all of it, as JSON)")


@ledger_app.command("history")
def ledger_history(
    run_dir: Path,
    which: str = typer.Argument(..., metavar="ID_OR_PROMPT", help="A record id (120 or #120), or a prompt: each record "
                                "of that prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: a list, one object per record."),
):
    """One record's story: the prompts it descends from, each round's verdict on it, what it bought and why."""
    from .data.history import find_records, history_lines, record_history

    with open_ledger(run_dir) as ledger:
        histories = [record_history(ledger, record_id) for record_id in find_records(ledger, which)]
    if as_json:
        print_json(histories)
        return
    for i, history in enumerate(histories):
        if i:
            say("")
        for line in history_lines(history):
            say(line)


@ledger_app.command("export")
def ledger_export(
    run_dir: Path,
    to: Path = typer.Option(..., "--to", parser=named_folder, metavar="FOLDER", help="Folder for the Hugging Face "
                            "imagefolder."),
    status: str = typer.Option("active", help="Records to export: active, deleted or all."),
):
    """Export records as a Hugging Face `datasets` imagefolder (images + metadata.jsonl)."""
    from .data import export_imagefolder

    if status not in ("active", "deleted", "all"):
        raise UserError(f"--status must be active, deleted or all, not {status!r}")
    with open_ledger(run_dir) as ledger:
        n = export_imagefolder(ledger, to, status=None if status == "all" else status)
    say(f"exported {n} records to {to}")


@ledger_app.command("import")
def ledger_import(
    run_dir: Path = typer.Argument(..., parser=named_folder, metavar="RUN_DIR"),
    source: Path = typer.Option(..., "--from", parser=named_folder, metavar="FOLDER", help="An imagefolder: images + metadata.jsonl/csv."),
    prompt_column: Optional[str] = typer.Option(None, help="Column holding prompts (default: prompt/text/caption)."),
):
    """Import a user's own prompt/image set into a run's ledger."""
    from .data import Ledger, claim_run_folder, describe_owner, folder_owner, import_imagefolder, release_run_folder

    if not source.is_dir():
        raise UserError(f"not a folder: {source}")
    if (owner := folder_owner(run_dir)) not in (None, "import"):  # records a run did not make stop it resuming
        raise UserError(f"{run_dir} is {describe_owner(owner)}: import into a new folder (or an earlier import's), "
                        "for `train`")
    if run_dir.is_dir():  # (a new folder: made only once the import has passed its checks)
        claim_run_folder(run_dir, "ledger import")  # not while a run writes its own records into it
    with Ledger(run_dir) as ledger:
        n = import_imagefolder(ledger, source, prompt_column=prompt_column)
    release_run_folder(run_dir)
    say(f"imported {n.summary} into {run_dir}")
