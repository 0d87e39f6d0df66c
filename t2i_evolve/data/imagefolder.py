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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UserError
from .cache import is_text
from ..files import write_atomically
from .ledger import Ledger, Record, Status

PROMPT_COLUMNS = ("prompt", "text", "caption")
"""Where `import_imagefolder` looks for prompts, in order, unless given a column."""

MANIFEST = ".t2i-evolve-export.json"
"""The file, in `train/`, where an export lists the files it wrote: the only files a rerun may remove.

Hidden (a leading dot), so `datasets` does not take it for data."""

_MANIFEST_KIND = "t2i-evolve imagefolder export"
_OUR_TEMP_FILE = re.compile(r"\.(\d+\.png|metadata\.jsonl|" + re.escape(MANIFEST) + r")\..+\.tmp")
"""Temporary files `write_atomically` leaves behind if killed mid-write (never removed, never in the way)."""


def export_imagefolder(ledger: Ledger, out_dir: str | os.PathLike, status: Status | None = "active") -> int:
    """Write the ledger's records with an image to `out_dir/train/` and return how many.

    Each image is copied to `<record id>.png`; `metadata.jsonl` holds the prompt and provenance of
    each (skills, generator, seed, round, op, record id, parent, status, the spec as a JSON string and
    the judge's score). The metadata file is replaced in one rename, so a reader never sees it
    half-written.

    `out_dir` must be empty, new, or an earlier export: exporting again into the same folder updates it,
    removing the images of records no longer exported. An earlier export is recognised only by its
    manifest (`MANIFEST`), which lists exactly the files it wrote, and only those are ever replaced or
    removed; a folder holding anything else is refused (a user's own dataset that happens to have
    numbered images must never be taken for an export and deleted).
    """
    out = Path(out_dir)
    train = out / "train"
    earlier = _check_export_target(out, train)
    records = [record for record in ledger.records(status) if record.image_path is not None]
    rows = [_export_row(record) for record in records]  # (all read before a folder is made: a damaged ledger, none)
    train.mkdir(parents=True, exist_ok=True)
    written = {row["file_name"] for row in rows} | {"metadata.jsonl"}
    # The manifest lists every file of ours at every moment: the old and the new ones while images
    # are copied, then only the new ones once the stale ones are gone. A crash at any point leaves a
    # folder that the next export still recognises, and finishes.
    _write_manifest(train, earlier | written)
    for record, row in zip(records, rows):  # never over a file in place: a kill mid-copy would leave it cut short
        target, data = train / row["file_name"], (ledger.run_dir / record.image_path).read_bytes()
        # Kept only if it is this image: another run's export into this folder has its own record 1.
        if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
            write_atomically(target, data)
    metadata = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomically(train / "metadata.jsonl", metadata.encode())
    for name in sorted(earlier - written):
        (train / name).unlink(missing_ok=True)
    _write_manifest(train, written)
    return len(rows)


def _export_row(record: Record) -> dict:
    """One line of `metadata.jsonl`: the prompt and provenance of a record."""
    return {
        "file_name": f"{record.id}.png",
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
    }


def _check_export_target(out: Path, train: Path) -> set[str]:
    """The files an earlier export wrote to `train` (none for a new or empty folder).

    Raises UserError, naming the folder, if `out` holds anything that no export of ours wrote.
    """
    def refuse(what: str) -> UserError:
        return UserError(
            f"{out} is not empty and not an earlier t2i-evolve export ({what}); "
            "choose an empty or new folder to export to"
        )

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose an empty or new folder to export to")
    if not out.is_dir():
        return set()
    others = sorted(p.name for p in out.iterdir() if p.name != "train")
    if others:  # (a run folder: named as one, not by the first file it holds, which may be its lock)
        run = "ledger.sqlite" in others or any(name in others for name in ("evolve.yaml", "demo.yaml", "config.yaml"))
        raise refuse("it is a run folder" if run else f"it holds {others[0]}")
    if not train.exists():
        return set()
    if not train.is_dir():
        raise refuse("train is a file")
    present = {p.name for p in train.iterdir() if not _OUR_TEMP_FILE.fullmatch(p.name)}
    if not present:
        return set()
    if MANIFEST not in present:
        raise refuse(f"{train} holds {sorted(present)[0]} and no {MANIFEST}")
    earlier = _read_manifest(train / MANIFEST)
    if earlier is None:
        raise refuse(f"{train / MANIFEST} is not a manifest this program wrote")
    strangers = sorted(present - earlier - {MANIFEST})
    if strangers:
        raise refuse(f"{train} holds {strangers[0]}, which no export wrote")
    return earlier


def _read_manifest(path: Path) -> set[str] | None:
    """The file names a manifest lists, or None if it is not one of ours (or not plain names)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != _MANIFEST_KIND:
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(
        isinstance(name, str) and name and name == Path(name).name and name not in (".", "..", MANIFEST)
        for name in files
    ):
        return None
    return set(files)


def _write_manifest(train: Path, files: set[str]) -> None:
    manifest = {"kind": _MANIFEST_KIND, "files": sorted(files)}
    write_atomically(train / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


@dataclass(frozen=True)
class ImportResult:
    """What an import did: `added` new records, `existing` ones the ledger already held (a rerun adds none)."""

    added: int
    existing: int

    @property
    def summary(self) -> str:
        """E.g. "4 new records" or "0 new records (4 already in the ledger)"."""
        text = f"{self.added} new record{'' if self.added == 1 else 's'}"
        return f"{text} ({self.existing} already in the ledger)" if self.existing else text


def import_imagefolder(
    ledger: Ledger,
    src_dir: str | os.PathLike,
    *,
    prompt_column: str | None = None,
    generator: str = "import",
    round: int = 0,
) -> ImportResult:
    """Add the images of an imagefolder as records (op 'import', no seed); returns how many records.

    Reads `metadata.jsonl` or `metadata.csv` at the top of `src_dir` and in each split folder under it.
    Prompts come from `prompt_column`, else from the first of `PROMPT_COLUMNS` present. `skills` and
    `spec` columns are kept when present (as written by `export_imagefolder`).

    Everything is checked before anything is added, and all records are added in one transaction: a
    missing image, a missing column or a corrupt file raises `UserError` naming it, and leaves the
    ledger as it was (a new ledger is not even created). Importing the same folder again adds
    nothing, and the result says so (`ImportResult.added`).
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
        before = ledger.count(None)
        ids = {
            ledger.add_record(
                prompt=prompt, generator=generator, image=_load(path), skills=skills, spec=spec,
                round=round, op="import",
            )
            for path, prompt, skills, spec in items
        }
        added = ledger.count(None) - before
    return ImportResult(added, len(ids) - added)


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
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}: cannot read CSV ({e})") from None
        for line, row in rows:  # DictReader files extra fields under None and fills missing ones with None
            if None in row or None in row.values():
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise UserError(f"{path}:{line}: {fields} fields where the header has {len(reader.fieldnames or [])}"
                                " (quote a prompt that holds a comma)")
        return rows
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
        if not is_text(row):
            raise UserError(f"{path}:{line}: holds half a UTF-16 pair (a lone \\ud800-\\udfff escape), which is not text")
        rows.append((line, row))
    return rows


def _prompt_column(path: Path, rows: list[tuple[int, dict]], wanted: str | None) -> str:
    if not rows:
        raise UserError(f"{path} lists no images (an export of a run with no records, say)")
    columns = {key for _, row in rows for key in row}
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{path} has no column {wanted!r} (columns: {', '.join(sorted(columns))})")
        return wanted
    for column in PROMPT_COLUMNS:
        if column in columns:
            return column
    raise UserError(
        f"{path} has no prompt column ({', '.join(PROMPT_COLUMNS)}; columns: {', '.join(sorted(columns))}); "
        "name the column that holds prompts with --prompt-column"
    )


def _check_row(metadata: Path, line: int, row: dict, column: str) -> tuple[Path, str, list[str], Any]:
    """Validate one metadata row; returns (image path, prompt, skills, spec)."""
    where = f"{metadata}:{line}"
    prompt, file_name = row.get(column), row.get("file_name")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: no prompt in column {column!r}")
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: no file_name")
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts:  # an imagefolder's images are its own
        raise UserError(f"{where}: file_name {file_name!r} points outside {metadata.parent}; give a path inside it")
    path = metadata.parent / file_name
    if not path.is_file():
        raise UserError(f"{where}: missing image {path}")
    try:
        with Image.open(path) as image:
            image.verify()  # the chunks' checksums
        with Image.open(path) as image:
            image.load()  # and every pixel decodes: no image fails inside the transaction, after others were stored
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
