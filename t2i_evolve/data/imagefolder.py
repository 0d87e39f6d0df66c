"""Hugging Face `imagefolder` export and import, the dataset format the diffusers training scripts read.

An imagefolder is a folder of images plus a `metadata.jsonl` (or `.csv`) whose `file_name` column names
each image; `datasets.load_dataset("imagefolder", data_dir=...)` turns it into a dataset with an `image`
column and one column per metadata field. Exporting to it lets any diffusers fine-tuning script train on
a run's data; importing from it lets a user seed a run with their own captioned images.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UserError
from .ledger import Ledger, Status, write_atomically

PROMPT_COLUMNS = ("prompt", "text", "caption")
"""Where `import_imagefolder` looks for prompts, in order, unless given a column."""

_EXPORTED_NAME = re.compile(r"\d+\.png|metadata\.jsonl|\.metadata\..*\.tmp")


def export_imagefolder(ledger: Ledger, out_dir: str | os.PathLike, status: Status | None = "active") -> int:
    """Write the ledger's records with an image to `out_dir/train/` and return how many.

    Each image is copied to `<record id>.png`; `metadata.jsonl` holds the prompt and provenance of
    each (skills, generator, seed, round, op, record id, parent, status, the spec as a JSON string and
    the judge's score). Exporting again into the same folder updates it: images of records that are no
    longer exported are removed, and the metadata file is replaced in one rename, so a reader never
    sees it half-written.
    """
    train = Path(out_dir) / "train"
    if train.is_dir():
        strangers = [p.name for p in train.iterdir() if not _EXPORTED_NAME.fullmatch(p.name)]
        if strangers:
            raise UserError(f"{train} holds files that no export wrote ({strangers[0]}); pick another folder")
    train.mkdir(parents=True, exist_ok=True)

    rows = []
    for record in ledger.records(status):
        if record.image_path is None:
            continue
        file_name = f"{record.id}.png"
        shutil.copyfile(ledger.run_dir / record.image_path, train / file_name)
        rows.append({
            "file_name": file_name,
            "prompt": record.prompt,
            "skills": list(record.skills),
            "generator": record.generator,
            "seed": record.seed,
            "round": record.round,
            "op": record.op,
            "record_id": record.id,
            "parent": record.parent,
            "status": record.status,
            "spec": None if record.spec is None else json.dumps(record.spec, ensure_ascii=False),
            "score": (record.judge or {}).get("score"),
        })

    exported = {row["file_name"] for row in rows}
    for path in train.glob("*.png"):
        if path.name not in exported:
            path.unlink()
    metadata = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomically(train / "metadata.jsonl", metadata.encode())
    return len(rows)


def import_imagefolder(
    ledger: Ledger,
    src_dir: str | os.PathLike,
    *,
    prompt_column: str | None = None,
    generator: str = "import",
    round: int = 0,
) -> int:
    """Add the images of an imagefolder as records (op 'import', no seed); returns how many records.

    Reads `metadata.jsonl` or `metadata.csv` at the top of `src_dir` and in each split folder under it.
    Prompts come from `prompt_column`, else from the first of `PROMPT_COLUMNS` present. `skills` and
    `spec` columns are kept when present (as written by `export_imagefolder`).

    Everything is checked before anything is added, and all records are added in one transaction: a
    missing image, a missing column or a corrupt file raises `UserError` naming it, and leaves the
    ledger as it was. Importing the same folder again adds nothing.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise UserError(f"no folder {src}")
    metadata_files = _metadata_files(src)
    if not metadata_files:
        raise UserError(f"no metadata.jsonl or metadata.csv in {src} or its split folders")

    items = []
    for metadata in metadata_files:
        rows = _read_rows(metadata)
        column = _prompt_column(metadata, rows, prompt_column)
        for line, row in rows:
            items.append(_check_row(metadata, line, row, column))

    with ledger.transaction():
        ids = {
            ledger.add_record(
                prompt=prompt, generator=generator, image=_load(path), skills=skills, spec=spec,
                round=round, op="import",
            )
            for path, prompt, skills, spec in items
        }
    return len(ids)


def _metadata_files(src: Path) -> list[Path]:
    """The metadata file of `src` and of each folder directly under it (a split), jsonl first."""
    folders = [src, *sorted(p for p in src.iterdir() if p.is_dir())]
    found = []
    for folder in folders:
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
    return found


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a metadata file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            return [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}: cannot read CSV ({e})") from None
    rows = []
    for line, row_text in enumerate(text.split("\n"), start=1):
        if not row_text.strip():
            continue
        try:
            row = json.loads(row_text)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line}: not a JSON object")
        rows.append((line, row))
    return rows


def _prompt_column(path: Path, rows: list[tuple[int, dict]], wanted: str | None) -> str:
    columns = {key for _, row in rows for key in row}
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{path} has no column {wanted!r} (columns: {', '.join(sorted(columns))})")
        return wanted
    for column in PROMPT_COLUMNS:
        if column in columns:
            return column
    raise UserError(f"{path} has no prompt column ({', '.join(PROMPT_COLUMNS)}); name one with prompt_column")


def _check_row(metadata: Path, line: int, row: dict, column: str) -> tuple[Path, str, list[str], Any]:
    """Validate one metadata row; returns (image path, prompt, skills, spec)."""
    where = f"{metadata}:{line}"
    prompt, file_name = row.get(column), row.get("file_name")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: no prompt in column {column!r}")
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: no file_name")
    path = metadata.parent / file_name
    if not path.is_file():
        raise UserError(f"{where}: missing image {path}")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:
        raise UserError(f"corrupt image {path} ({e})") from None
    skills = _json_field(row.get("skills"), where, "skills") or []
    if not (isinstance(skills, list) and all(isinstance(s, str) for s in skills)):
        raise UserError(f"{where}: skills must be a list of names")
    return path, prompt, skills, _json_field(row.get("spec"), where, "spec")


def _json_field(value: Any, where: str, name: str) -> Any:
    """A structured field as written to jsonl (already a value) or CSV (a JSON string)."""
    if not isinstance(value, str):
        return value
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        raise UserError(f"{where}: {name} is not valid JSON") from None


def _load(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:
        raise UserError(f"corrupt image {path} ({e})") from None
